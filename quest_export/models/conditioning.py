"""Conditioning for text pipelines: the packaged prompt list (quest_export/data/prompts) encoded by the pipeline's text encoder.

The bundled models and any ``--cond FILE`` need none of this. A pipeline folder with a
text encoder needs ``transformers`` (not a dependency of quest-export); without it the user
is told how to precompute a conditioning file instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quest_export.errors import InputError

PROMPTS = ("prompts", "default.txt")  # under quest_export/data


def encode_prompts(info, *, prompts_file: Path | None = None):
    """Encode a prompt list (default: the packaged one) (plus the empty prompt as the unconditional row)."""
    from quest_export.models.loading import Conditioning

    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError:
        raise InputError(
            f"{info.root} encodes prompts with its text encoder, which needs `pip install transformers`; "
            "or precompute encoder_hidden_states into a safetensors file and pass --cond FILE"
        ) from None
    if prompts_file is None:
        from quest_export.data import data

        path = data(*PROMPTS)
    else:
        path = Path(prompts_file)
    prompts = [p.strip() for p in path.read_text().splitlines() if p.strip() and not p.startswith("#")]
    tok = AutoTokenizer.from_pretrained(str(info.root / "tokenizer"))
    enc = CLIPTextModel.from_pretrained(str(info.root / "text_encoder")).eval()
    rows = []
    with torch.no_grad():
        for p in prompts + [""]:
            ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            rows.append(enc(ids.input_ids)[0][0])  # (L, D)
    table = torch.stack(rows)  # (R, L, D)
    return Conditioning(table=table, uncond_index=len(prompts), labels=prompts + ["<unconditional>"], source=str(path))
