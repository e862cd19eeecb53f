"""Vision-and-language navigation (VLN): the pretrained backbone sites adapt (issue 5).

    tokenizer   word-level mission vocabulary ([PAD] [CLS] [SEP] [MASK] [UNK] + the BabyAI grammar)
    babyai      expert demonstrations from minigrid's BabyAI bot, cached on disk; rollout evaluation
    r2r         a seeded generator of R2R-shaped episodes (viewpoint graphs, 36-view panoramas)
    metrics     exact R2R metrics on a viewpoint graph: NE, SR, OSR, TL, SPL
    backbone    the cross-modal transformer (language, vision, LXMERT-style cross-modal layers)
    adapt       wrap the backbone's linear layers in WAFFLe / LoRA / FFA-LoRA / dense adapters
    checkpoint  safetensors checkpoint + model card, digest- and architecture-checked on load
    pretrain    PREVALENT-style pretraining: attended masked language modelling + action prediction
    finetune    behaviour cloning on a site's levels, evaluation by accuracy and by rollouts

Modules are imported one by one (nothing is re-exported here) so that, e.g., the R2R metrics do
not pull in minigrid.
"""
