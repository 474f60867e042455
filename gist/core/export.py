"""Write a trained student as a sentence-transformers folder: the base model's own modules (Transformer,
Pooling with its config, Dense, Normalize, ...), prompts and max length, with the trained weights (LoRA
merged), and a model card written offline from sentence-transformers' model-card data.

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("<run_dir>/model")   # same embeddings as the in-training encoder
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from gist.core.encoder import Encoder, hub_commit

# GISTEmbed (Solatorio 2024, arXiv:2402.16829), as its paper asks to be cited.
GIST_CITATION = """@article{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    journal={arXiv preprint arXiv:2402.16829},
    year={2024},
    URL={https://arxiv.org/abs/2402.16829},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""


@dataclass
class TrainingCard:
    """What the model card says about the training run (gist.train fills it from the config).

    guide: the guide's name (and revision), or None for guide-free losses.
    loss: the loss class name; loss_params: its hyper-parameters.
    data: training data sources (files, hub datasets, derived sources), by name.
    hyperparameters: steps, batch size, lr, precision, ... as they should appear.
    results: the end-of-run comparison as a markdown table (added after the evaluation), or None.
    """

    guide: str | None = None
    loss: str = ""
    loss_params: dict = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    hyperparameters: dict = field(default_factory=dict)
    results: str | None = None


def export_sentence_transformer(
    encoder: Encoder, path: str | Path, card: TrainingCard | None = None, save_adapter: bool = False
) -> Path:
    """Save `encoder` as a sentence-transformers folder at `path`, atomically (a `.partial` folder renamed
    into place). With LoRA the weights are merged (plain `SentenceTransformer(path)` loads them) and,
    with `save_adapter`, the adapter alone is saved beside them in `path/adapter` (peft's format)."""
    path = Path(path)
    work = path.with_name(path.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    card = card or TrainingCard()
    with encoder.sentence_transformer() as st:
        describe(st, encoder, card)
        st.save(str(work))
        (work / "README.md").write_text(card_text(st, encoder, card))
    if save_adapter and encoder.lora:
        encoder.model.save_pretrained(str(work / "adapter"))
    shutil.rmtree(path, ignore_errors=True)
    work.rename(path)
    return path


def base_revision(encoder: Encoder) -> str | None:
    """The base model's commit as resolved in the local Hugging Face cache (else the configured
    revision); None for a local folder."""
    if Path(encoder.name).is_dir():
        return None
    return hub_commit(encoder.name, encoder.revision) or encoder.revision


def describe(st, encoder: Encoder, card: TrainingCard) -> None:
    """Fill `st`'s model-card data offline (no hub call): base model and revision, the GIST training
    record as hyper-parameters, the data sources, the citation."""
    data = st.model_card_data
    data.local_files_only = True  # sentence-transformers would otherwise look the base model up on the hub
    data.base_model = encoder.name
    data.base_model_revision = base_revision(encoder)
    data.model_name = f"{Path(encoder.name).name} fine-tuned with GISTEmbed"
    data.train_datasets = []  # the template wants per-column statistics: the sources are listed in our section
    data.generate_widget_examples = False
    described = {
        "guide": card.guide or "none",
        "loss": card.loss,
        **{f"loss.{k}": v for k, v in card.loss_params.items()},
    }
    described.update(card.hyperparameters)
    if encoder.lora:
        described["lora"] = encoder.lora
    data.all_hyperparameters = described
    data.non_default_hyperparameters = {}
    data.citations = {"GISTEmbed": GIST_CITATION}
    data.add_tags(["gist", "gistembed"])


def write_model_card(path: str | Path, encoder: Encoder, card: TrainingCard) -> Path:
    """Rewrite `path`/README.md (e.g. once `card.results` is known)."""
    with encoder.sentence_transformer() as st:
        readme = Path(path) / "README.md"
        readme.write_text(card_text(st, encoder, card))
    return readme


def card_text(st, encoder: Encoder, card: TrainingCard) -> str:
    """sentence-transformers' card for `st`, then the training record and, when `card.results` is set,
    the end-of-run MTEB table."""
    from sentence_transformers.base.model_card import generate_model_card

    describe(st, encoder, card)
    text = generate_model_card(st)
    lines = [
        "",
        "## GISTEmbed fine-tuning",
        "",
        f"- Base model: `{encoder.name}` (revision {base_revision(encoder) or 'local folder'})",
    ]
    lines.append(f"- Guide: `{card.guide}`" if card.guide else "- Guide: none (guide-free loss)")
    lines.append(f"- Loss: `{card.loss}` " + ", ".join(f"{k}={v}" for k, v in card.loss_params.items()))
    if card.data:
        lines.append("- Training data: " + ", ".join(f"`{d}`" for d in card.data))
    lines += [f"- {k}: {v}" for k, v in card.hyperparameters.items()]
    if card.results:
        lines += ["", "### End-of-run evaluation (MTEB task folders, mteb's evaluators)", "", card.results.rstrip()]
    return text.rstrip() + "\n" + "\n".join(lines) + "\n"
