"""Modern embedders on tiny random models saved as sentence-transformers folders (offline): every pooling
mode, decoders (Qwen3, Llama: rotary positions, left padding, pad id != 0), MPNet (pad id 1), prompts and
instructions per role for the student and the guide, and the export through sentence-transformers' own
model of the base.

Tolerances (stated once): embeddings are unit vectors. Ours vs `SentenceTransformer.encode` and bucketed
vs plain differ by fp32 summation order and, under left padding, by the rotary positions' common shift
(ours count positions from each text's first token; sentence-transformers from the padded row's start;
rotary attention depends on position differences only, so the two agree up to rounding): atol 1e-5
(measured <= 1e-7 on tiny models). Gradients: atol 1e-4 x the largest gradient + 5e-6 (as in
tests/test_encoder.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gist.core.bucketing import encode_blocks
from gist.core.encoder import Encoder
from gist.core.inputs import TextInputs
from gist.core.pooling import POOLING_MODES, pool

pytestmark = pytest.mark.unit

TEXTS = ["the cat plays piano very well", "dog", "what is the bank card money account", "i love pizza and cheese"]
# BERT mean, MPNet mean, Qwen3 lasttoken, Llama weightedmean
MODELS = ["tiny_student", "tiny_mpnet", "tiny_qwen3", "tiny_llama"]


def _st(path, pooling=None, include_prompt=None):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    if pooling is not None:
        st[1].pooling_mode = pooling
    if include_prompt is not None:
        st[1].include_prompt = include_prompt
    return st


def _mask(lengths, width, side):
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, width - n :] = 1
    return mask


@pytest.mark.parametrize("mode", [*POOLING_MODES, ("cls", "mean")])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt_length", [None, 2])
def test_pool_equals_sentence_transformers_pooling(mode, side, prompt_length):
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 8)
    mask = _mask([7, 4, 3, 5], 7, side)
    module = Pooling(8, pooling_mode=mode, include_prompt=prompt_length is None)
    features = {"token_embeddings": hidden, "attention_mask": mask}
    if prompt_length is not None:
        features["prompt_length"] = prompt_length
    ref = module(features)["sentence_embedding"]
    lengths = None if prompt_length is None else torch.full((4,), prompt_length)
    got = pool(hidden, mask, mode, lengths)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # same definition, same fp32 operations


def test_unknown_pooling_is_an_error_not_a_fallback(tiny_student):
    with pytest.raises(ValueError, match="unknown pooling mode 'max-ish'"):
        Encoder(str(tiny_student), pooling="max-ish")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "first")


@pytest.mark.parametrize("model", MODELS)
def test_encoder_reads_the_models_pooling_and_padding(request, model):
    path = request.getfixturevalue(model)
    enc = Encoder(str(path))
    expected = {"tiny_student": "mean", "tiny_mpnet": "mean", "tiny_qwen3": "lasttoken", "tiny_llama": "weightedmean"}
    assert enc.pooling == expected[model]
    decoder = model in ("tiny_qwen3", "tiny_llama")
    assert enc.tokenizer.padding_side == ("left" if decoder else "right")
    assert (enc.tokenizer.pad_token_id != 0) == (model != "tiny_student")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pooling", [None, "lasttoken", "max", "cls"])
def test_encoder_equals_sentence_transformers_encode(request, model, pooling):
    path = request.getfixturevalue(model)
    enc = Encoder(str(path), pooling=pooling).eval()
    st = _st(path, pooling)
    for role in ("query", "document"):
        ours = enc.encode(TEXTS, batch_size=3, role=role)
        ref = F.normalize(torch.as_tensor(st.encode(TEXTS, prompt_name=role, batch_size=4)), dim=-1)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "weightedmean", "lasttoken", "cls"])
def test_include_prompt_false_leaves_the_prompt_out_as_sentence_transformers_does(tiny_qwen3, pooling):
    enc = Encoder(str(tiny_qwen3), pooling=pooling, include_prompt=False).eval()
    st = _st(tiny_qwen3, pooling, include_prompt=False)
    ours = enc.encode(TEXTS, role="query")
    ref = F.normalize(torch.as_tensor(st.encode(TEXTS, prompt_name="query")), dim=-1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    with_prompt = Encoder(str(tiny_qwen3), pooling=pooling, include_prompt=True).eval().encode(TEXTS, role="query")
    if pooling != "lasttoken":  # the last token is never a prompt token: identical by definition
        assert (ours - with_prompt).abs().max() > 1e-3


def test_lasttoken_pools_the_eos_that_qwen3_appends(tiny_qwen3):
    enc = Encoder(str(tiny_qwen3)).eval()
    features = enc.tokenize(TEXTS)
    eos = enc.tokenizer.eos_token_id
    assert (features["input_ids"][:, -1] == eos).all()  # left padding: every text ends in the last column
    assert (features["attention_mask"][:, 0] == 0).any()  # ...and is padded on the left
    hidden = enc.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
    torch.testing.assert_close(enc(features), F.normalize(hidden[:, -1], dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("bucket_size", [1, 3])
def test_bucketed_equals_plain_for_every_family(request, model, bucket_size):
    """Length buckets (trimmed on the tokenizer's side, pad id kept) = one forward per block: embeddings and
    gradients, with the role prompts (different lengths per block) and prompt lengths in the inputs."""
    path = request.getfixturevalue(model)
    enc = Encoder(str(path), include_prompt=False if model == "tiny_qwen3" else None).eval()
    inputs = enc.inputs
    texts = {
        "anchor": ["a b c d e f g h", "x", "the cat sat", "one two three four five six seven eight nine ten"],
        "positive": ["q w", "e r t y u i o", "p", "z z z z"],
        "negative": ["lorem ipsum dolor sit amet", "k", "m n b v", "c"],
    }
    blocks = {b: inputs(v, "query" if b == "anchor" else "document")[1] for b, v in texts.items()}
    assert len({f["input_ids"].size(1) for f in blocks.values()}) > 1
    assert ("prompt_length" in blocks["anchor"]) == (model == "tiny_qwen3")

    def run(size):
        enc.zero_grad()
        out = encode_blocks(enc, blocks, size)
        weights = torch.linspace(-1, 1, 12).reshape(3, 4, 1)
        sum(((out[k] * w).sum() for k, w in zip(texts, weights))).backward()
        return out, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    ref, ref_grads = run(None)
    got, got_grads = run(bucket_size)
    for k in texts:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-4 * scale + 5e-6, msg=n)


def test_prompts_instructions_and_precedence():
    inputs = TextInputs(
        None,
        32,
        prompts={"query": "query: ", "document": "", "classification": "classify: "},
        default_prompt_name="classification",
        instructions={"query": "Instruct: {instruct}\nQuery: "},
    )
    assert inputs.prompt("query", "Find answers ") == "Instruct: Find answers\nQuery: "  # instruction first
    assert inputs.prompt("query", "") == "query: "  # no instruction in the row: the role's prompt
    assert inputs.prompt("document", "Represent the doc") == "classify: "  # no template: role prompt "" -> default
    with pytest.raises(ValueError, match="placeholder"):
        TextInputs(None, 8, instructions={"query": "Instruct: "})
    with pytest.raises(ValueError, match="unknown role"):
        TextInputs(None, 8, instructions={"anchor": "{instruct}"})
    with pytest.raises(ValueError, match="default_prompt_name"):
        TextInputs(None, 8, prompts={"query": "q"}, default_prompt_name="nope")


def test_student_and_guide_prompt_with_their_own_settings(tiny_student, tiny_guide, gist_rows, tmp_path):
    from gist.core.encoder import FrozenGuide
    from gist.core.guide_cache import GuideCache
    from gist.data.collate import Collator
    from gist.data.records import parse_row, text_id

    student = Encoder(
        str(tiny_student),
        prompts={"query": "query: ", "document": "passage: "},
        instructions={"query": "Instruct: {instruct}\nQuery: "},
    )
    guide = FrozenGuide(Encoder(str(tiny_guide), prompts={"query": "search: "}))
    rows = [parse_row(r, "x") for r in gist_rows if r["task_name"] == "task-a"][:4]
    batch = Collator(student.inputs, guide.inputs)(rows)
    assert batch.texts["anchor"][0] == "Instruct: Represent the query:\nQuery: " + rows[0]["query"]
    assert batch.texts["positive"][0] == "passage: " + rows[0]["pos"]  # the document role has no template
    # The guide reads its own prompts: its query prompt, and no document prompt.
    expected = guide.tokenize([r["query"] for r in rows], "search: ")["input_ids"]
    assert torch.equal(batch.guide["anchor"]["input_ids"], expected)
    assert torch.equal(batch.guide_text_ids["anchor"], torch.tensor([text_id("search: " + r["query"]) for r in rows]))
    assert torch.equal(batch.guide_text_ids["positive"], torch.tensor([text_id(r["pos"]) for r in rows]))
    # The guide cache filled from rows (prefill) holds exactly the keys the collator looks up.
    cache = GuideCache.for_encoder(tmp_path, guide)
    assert cache.dir != GuideCache.for_encoder(tmp_path, Encoder(str(tiny_guide))).dir  # prompts are identity
    cache.fill(guide, [item for r in rows for item in guide.inputs.row_items(r)])
    cached = Collator(student.inputs, guide.inputs, guide_cache=cache)(rows)
    assert cached.guide_emb is not None and cached.guide is None
    live = encode_blocks(guide, batch.guide)
    for block, emb in cached.guide_emb.items():  # float16 storage: 2^-11 relative per element
        torch.testing.assert_close(emb, live[block], rtol=2e-3, atol=2e-3)


def test_export_keeps_the_base_modules_and_reproduces_embeddings(tiny_qwen3, tmp_path):
    """A decoder with last-token pooling and prompts: the export is the base's sentence-transformers model
    (pooling config, prompts, Normalize) with the trained weights and a model card that names the base."""
    from sentence_transformers import SentenceTransformer

    from gist.core.export import TrainingCard, export_sentence_transformer

    enc = Encoder(str(tiny_qwen3))
    with torch.no_grad():
        for p in enc.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained": differs from the base
    card = TrainingCard(guide=None, loss="MNRLLoss", loss_params={"temperature": 0.05}, data=["train.jsonl"])
    path = export_sentence_transformer(enc, tmp_path / "model", card)
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "lasttoken"
    prompts = json.loads((path / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Instruct: find the text\nQuery: "
    loaded = SentenceTransformer(str(path), device="cpu")
    enc.eval()
    for role in ("query", "document"):
        ref = torch.as_tensor(loaded.encode(TEXTS, prompt_name=role))
        torch.testing.assert_close(enc.encode(TEXTS, role=role), ref, rtol=0, atol=1e-5)
    readme = (path / "README.md").read_text()
    assert str(tiny_qwen3) in readme and "MNRLLoss" in readme and "solatorio2024gistembed" in readme
    assert "train.jsonl" in readme and "Guide: none" in readme


def test_export_keeps_a_dense_layer_of_the_base(tiny_student, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense

    from gist.core.export import export_sentence_transformer

    base = SentenceTransformer(str(tiny_student), device="cpu")
    base.append(Dense(32, 16))
    base.save(str(tmp_path / "dense-base"))
    enc = Encoder(str(tmp_path / "dense-base")).eval()
    assert enc.dim == 16 and any(p.requires_grad for p in enc.head.parameters())  # the Dense layer trains
    path = export_sentence_transformer(enc, tmp_path / "model")
    loaded = SentenceTransformer(str(path), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Dense", "Normalize"]
    torch.testing.assert_close(enc.encode(TEXTS), torch.as_tensor(loaded.encode(TEXTS)), rtol=0, atol=1e-5)


def test_evaluation_hands_the_prompts_to_mteb(tiny_student, mteb_dir):
    """mteb's prompt mechanism picks the student's prompt by task name, then task type, then role."""
    from mteb.types import PromptType

    from gist.evaluation.harness import _mteb_wrapper, pretrained_model
    from gist.evaluation.tasks import load_tasks

    enc = Encoder(str(tiny_student), prompts={"TinySTS": "similar: ", "Classification": "topic: ", "query": "q: "})
    wrapper = _mteb_wrapper(pretrained_model(enc))
    sts, topic = (t.metadata for t in load_tasks(mteb_dir, ["TinySTS", "TinyTopicClassification"]))
    texts = ["the cat plays piano", "a dog"]
    batches = [{"text": texts}]

    def encoded(metadata, prompt_type=None):
        return torch.as_tensor(
            wrapper.encode(
                batches, task_metadata=metadata, hf_split="test", hf_subset="default", prompt_type=prompt_type
            )
        )

    torch.testing.assert_close(encoded(sts), enc.encode(texts, prompt="similar: "), rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded(topic), enc.encode(texts, prompt="topic: "), rtol=0, atol=1e-6)
    plain = Encoder(str(tiny_student), prompts={"query": "q: "})
    got = torch.as_tensor(
        _mteb_wrapper(pretrained_model(plain)).encode(
            batches, task_metadata=sts, hf_split="test", hf_subset="default", prompt_type=PromptType.query
        )
    )
    torch.testing.assert_close(got, plain.encode(texts, role="query"), rtol=0, atol=1e-6)
    assert (got - plain.encode(texts)).abs().max() > 1e-4  # the prompt changed the embeddings
