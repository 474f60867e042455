"""Raw texts -> one encoder's model inputs: the prompt of each text's role, tokenization, prompt lengths.

Two roles, as sentence-transformers and mteb name them: "query" (anchors) and "document" (positives and
negatives). A text's prompt is, in order of precedence:

1. its role's instruction template filled with the row's own instruction (the GIST/MEDI schema's
   `query_instruct` / `pos_instruct` / `neg_instruct`), when both exist:
   `instructions={"query": "Instruct: {instruct}\\nQuery: "}` turns the row's query_instruct
   "Given a question, retrieve answers" into "Instruct: Given a question, retrieve answers\\nQuery: ";
2. else the role's named prompt (`prompts["query"]` / `prompts["document"]`, as in
   config_sentence_transformers.json);
3. else the default prompt (`prompts[default_prompt_name]`), else none.

The prompt is prepended as is (sentence-transformers' convention). With `include_prompt=False` (a
pooling setting) the tokenized inputs also carry each text's `prompt_length` in tokens, counted as
sentence-transformers counts it (the prompt tokenized alone, less a trailing special token), so that
pooling can leave the prompt's tokens out. Picklable (DataLoader workers hold one per encoder):

    inputs = TextInputs(tokenizer, 256, prompts={"query": "query: "}, include_prompt=True)
    texts = inputs.texts(["what is GIST?"], "query")      # ["query: what is GIST?"]
    features = inputs.tokenize(texts, prompts=inputs.prompts_of(["what is GIST?"], "query"))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROLES = ("query", "document")


@dataclass
class TextInputs:
    """Args:
    tokenizer: the encoder's tokenizer (its padding side is kept: left for most decoders).
    max_length: tokens per text (truncation).
    prompts: named prompts (role names, mteb task names or types); "" or absent = no prompt.
    default_prompt_name: the prompt used when a role has none of its own.
    instructions: role -> template with "{instruct}", filled with the row's instruction.
    include_prompt: False adds `prompt_length` to the tokenized inputs (pooling skips those tokens).
    """

    tokenizer: object
    max_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    instructions: dict[str, str] = field(default_factory=dict)
    include_prompt: bool = True

    def __post_init__(self) -> None:
        for role in self.instructions:
            if role not in ROLES:
                raise ValueError(f"instructions: unknown role {role!r}; roles are {ROLES}")
        for role, template in self.instructions.items():
            if template is not None and "{instruct}" not in template:
                raise ValueError(f"instructions.{role}: the template {template!r} has no '{{instruct}}' placeholder")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(
                f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts {sorted(self.prompts)}"
            )
        self._prompt_lengths: dict[str, int] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_prompt_lengths"] = {}
        return state

    def prompt(self, role: str, instruct: str | None = None) -> str:
        """The prompt of one text of `role` whose row gives `instruct` (None or "" = no instruction)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        template = self.instructions.get(role)
        if template and instruct and instruct.strip():
            return template.format(instruct=instruct.strip())
        if self.prompts.get(role):
            return self.prompts[role]
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    def prompts_of(self, texts: list[str], role: str, instructs: list[str | None] | None = None) -> list[str]:
        return [self.prompt(role, instructs[i] if instructs else None) for i in range(len(texts))]

    def texts(self, texts: list[str], role: str, instructs: list[str | None] | None = None) -> list[str]:
        """Each text with its prompt prepended."""
        return [p + t for p, t in zip(self.prompts_of(texts, role, instructs), texts)]

    def prompt_length(self, prompt: str) -> int:
        """Tokens of `prompt` at the start of a prompted text (sentence-transformers' count)."""
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer([prompt], truncation=True, max_length=self.max_length)["input_ids"][0]
            n = len(ids)
            if ids and ids[-1] in set(self.tokenizer.all_special_ids):
                n -= 1
            self._prompt_lengths[prompt] = n if prompt else 0
        return self._prompt_lengths[prompt]

    def prompts_equal(self, other: TextInputs) -> bool:
        """Whether `other` gives every text the same prompt as this one does."""
        same = ("prompts", "default_prompt_name", "instructions")
        return all(getattr(self, k) == getattr(other, k) for k in same)

    def key(self, prompt: str, text: str) -> str:
        """The string a text is known by in caches (gist.data.records.text_id of it): the prompted text;
        with include_prompt False the prompt's extent matters too, so it is marked."""
        return prompt + text if self.include_prompt else f"{prompt}\x1f{text}"

    def row_items(self, row: dict) -> list[tuple[str, str]]:
        """(prompt, text) of each text of a training row (gist.data.records.parse_row)."""
        instruct = row.get("instruct") or {}
        return [
            (self.prompt("query" if field == "query" else "document", instruct.get(field)), row[field])
            for field in ("query", "pos", "neg")
            if row.get(field)
        ]

    def tokenize(self, texts: list[str], prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Already prompted `texts` -> {input_ids, attention_mask[, token_type_ids][, prompt_length]}, each
        (B, L) int64 padded to the longest text on the tokenizer's side; `prompt_length` (B,) int64 when
        include_prompt is False (`prompts`: each text's prompt, as `prompts_of` gives them)."""
        out = dict(
            self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )
        if not self.include_prompt:
            prompts = prompts if prompts is not None else [""] * len(texts)
            out["prompt_length"] = torch.tensor([self.prompt_length(p) for p in prompts], dtype=torch.long)
        return out

    def __call__(
        self, texts: list[str], role: str, instructs: list[str | None] | None = None
    ) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Raw texts of one role -> (prompted texts, tokenized inputs)."""
        prompts = self.prompts_of(texts, role, instructs)
        full = [p + t for p, t in zip(prompts, texts)]
        return full, self.tokenize(full, prompts)
