"""The text replication's parts: the MiniLM-compatible BERT, students built from it, the data."""
from __future__ import annotations

import pytest
import torch

from kt_core.distill.bert import UNK_ID, BertClassifier, BertConfig, StudentSpec, build_student
from kt_core.distill.loop import BucketBatchSampler, DictDataset
from kt_core.distill.text import TextDataSpec, load_text_data, read_labelled_csv, sentiment_csv

torch.set_num_threads(1)
TINY = BertConfig(vocab_size=30522, hidden=32, layers=3, heads=2, intermediate=64, max_positions=64, num_labels=3,
                  dropout=0.0)


def batch(ids):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_student_copies_the_first_layers_and_prunes_the_vocabulary():
    torch.manual_seed(0)
    source = BertClassifier(TINY).eval()
    counts = torch.zeros(30522)
    counts[[2000, 2001, 2002]] = torch.tensor([5.0, 9.0, 1.0])
    student = build_student(source, StudentSpec(layers=2, vocab=7, dropout=0.0), token_counts=counts).eval()
    assert student.config.vocab_size == 7 and student.config.input_vocab == 30522
    for i in range(2):
        for (n, a), (_, b) in zip(student.encoder.layer[i].state_dict().items(),
                                  source.encoder.layer[i].state_dict().items()):
            assert torch.equal(a, b), n
    # kept tokens read the source's embeddings; a dropped token reads [UNK]'s
    words = student.embed(batch([[101, 2001, 2000, 2002, 4444, 102]]))["words"][0]
    src = source.embeddings.word_embeddings.weight
    for pos, tok in enumerate([101, 2001, 2000]):
        assert torch.equal(words[pos], src[tok])
    assert torch.equal(words[3], src[UNK_ID]) and torch.equal(words[4], src[UNK_ID])  # 2002: 3rd most frequent
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in source.parameters())


def test_narrow_student_starts_from_projected_embeddings():
    torch.manual_seed(0)
    source = BertClassifier(TINY)
    student = build_student(source, StudentSpec(layers=1, hidden=16, dropout=0.0))
    assert student.config.hidden == 16 and student.config.heads == 1
    out = student(batch([[101, 2000, 102, 0]]))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_padding_does_not_change_the_prediction():
    torch.manual_seed(0)
    model = BertClassifier(TINY).eval()
    short = model(batch([[101, 2000, 2001, 102]]))
    padded = model(batch([[101, 2000, 2001, 102, 0, 0, 0]]))
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)


def test_bucketed_batches_cover_every_example_once():
    from torch.utils.data import DistributedSampler

    lengths = torch.randint(1, 30, (103,))
    data = DictDataset({"labels": torch.zeros(103, dtype=torch.long)})
    sampler = BucketBatchSampler(DistributedSampler(data, num_replicas=1, rank=0, seed=1), lengths, 8, chunk=4)
    sampler.set_epoch(1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for b in batches for i in b) == list(range(103))
    spread = [int(lengths[b].max() - lengths[b].min()) for b in batches]
    assert sum(spread) / len(spread) < 10  # similar lengths together (random batches would spread ~25)


def test_the_corpus_has_three_sentiment_labels():
    texts, labels = read_labelled_csv(sentiment_csv())
    assert len(texts) == len(labels) > 30000 and set(labels) == {"negative", "neutral", "positive"}


def test_corpus_split_is_seeded_and_the_fraction_is_of_the_training_part(tmp_path):
    from tests.test_distill_participant import write_csv

    csv = write_csv(tmp_path / "tweets.csv", n=240)
    a = load_text_data(TextDataSpec(csv=csv, max_samples=200, max_len=32, seed=3), cache_dir=tmp_path)
    b = load_text_data(TextDataSpec(csv=csv, max_samples=200, max_len=32, seed=3, data_fraction=0.1), cache_dir=tmp_path)
    assert a.labels == ("negative", "neutral", "positive")
    assert len(a.test) == 40 and len(a.train) == 160 and len(b.student_train) == 16
    assert torch.equal(a.test.tensors["input_ids"], b.test.tensors["input_ids"])
    assert list(tmp_path.glob("tokens-*.npz"))  # tokenization cached
    assert int(a.token_counts.sum()) == int(a.student_train.tensors["attention_mask"].sum())


@pytest.mark.slow
def test_minilm_loads_and_matches_transformers():
    from transformers import BertModel

    from kt_core.distill.text import load_pretrained, load_tokenizer, minilm_dir

    ours = load_pretrained(3).eval()
    theirs = BertModel.from_pretrained(str(minilm_dir())).eval()
    enc = load_tokenizer(minilm_dir(), 24).encode_batch(["self-driving cars are great", "no way, never!"])
    b = {"input_ids": torch.tensor([e.ids for e in enc]), "attention_mask": torch.tensor([e.attention_mask for e in enc])}
    captured = {}
    ours.classifier.register_forward_hook(lambda m, i, o: captured.setdefault("pooled", i[0]))
    with torch.no_grad():
        ours(b)
        h = theirs(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(captured["pooled"], (h * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-5)
