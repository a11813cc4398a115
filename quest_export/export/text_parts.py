"""The float parts of a text-to-image bundle: tokenizer.json, the CLIP text encoder and the VAE decoder as ONNX.

The UNet is the quantized graph; these stay float32 (issue 15) so that the torch-free runtime turns a prompt into
an image on the device (quest_export_runtime/text.py):

    text/tokenizer.json       the pipeline's tokenizer for the `tokenizers` package, padding and truncation to the
                              text encoder's length configured in it; its ids are checked against transformers'
    text/text_encoder.onnx    input_ids (B, L) int64 -> encoder_hidden_states (B, L, D) float32 (last hidden state)
    vae/vae_decoder.onnx      latents (B, 4, h, w) float32 -> image (B, 3, H, W) float32 in about [-1, 1]; the
                              1 / scaling_factor of the latents is inside the graph

Each graph is run once through ONNX Runtime here and compared with torch on the calibration prompts (encoder) and
on latents drawn from N(0, 1) (decoder); the errors go into the manifest (``text_to_image.check``) and an error past
``TOLERANCE`` refuses the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from quest_export.errors import ExportError
from quest_export.export import graph as G

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # max |ORT - torch| relative to max |torch|; float32 graphs measure about 1e-6
LONG_PROMPT = " ".join(["a photograph of the cat"] * 40)  # longer than 77 tokens: the truncation path is checked


class _Decoder(torch.nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae, self.scale = vae, float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents / self.scale).sample


class _Encoder(torch.nn.Module):
    def __init__(self, enc) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, input_ids):
        return self.enc(input_ids=input_ids)[0]


def _export(module, args: tuple, path: Path, names: list[str], out: str, opset: int, external) -> str | None:
    import tempfile
    import warnings

    import onnx

    with tempfile.TemporaryDirectory(prefix="quest-text-") as td:
        traced = Path(td) / "traced.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(traced), dynamo=False, opset_version=opset, input_names=names,
                                  output_names=[out], dynamic_axes={n: {0: "batch"} for n in [*names, out]},
                                  do_constant_folding=True)  # fmt: skip
        except (RuntimeError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx.export of {path.name} failed: {first}") from e
        model = onnx.load(str(traced), load_external_data=True)
    return G.save_graph(model, path, external=external(model))


def _ort(path: Path, feed: dict) -> np.ndarray:
    """The graph's one output in ONNX Runtime on the CPU, through the runtime's own runner (what the device runs)."""
    from quest_export_runtime.session import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]) as runner:
        (out,) = runner.infer(feed).values()
    return out


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def write_text_parts(model, tmp: Path, *, opset: int, external) -> dict:
    """Write text/ and vae/ under ``tmp`` for a text pipeline ``model`` (LoadedModel); returns the manifest entry.

    ``external(onnx_model) -> bool``: whether a graph keeps its initializers in a .data file (export.external_data).
    """
    from quest_export.models.text import load_text_encoder, load_tokenizer, load_vae, read_prompts, token_ids

    parts = model.info.text
    tok = load_tokenizer(parts)
    length = int(tok.model_max_length)
    if not 1 <= length <= 4096:
        raise ExportError(f"{parts.tokenizer}: model_max_length {tok.model_max_length} is not a sequence length; set "
                          "it in tokenizer_config.json (77 for CLIP)")  # fmt: skip
    (tmp / "text").mkdir()
    (tmp / "vae").mkdir()
    # the tokenizer for the device: the fast tokenizer's own file, padding and truncation to `length` built in
    backend = type(tok.backend_tokenizer).from_str(tok.backend_tokenizer.to_str())
    backend.enable_truncation(length)
    backend.enable_padding(length=length, pad_id=int(tok.pad_token_id), pad_token=str(tok.pad_token))
    backend.save(str(tmp / "text" / "tokenizer.json"))
    prompts = read_prompts(model.info.prompts)[0] + ["", LONG_PROMPT]
    ids = token_ids(tok, prompts)  # (R, L) transformers' ids: what the pipeline and the calibration fed
    dev_ids = np.asarray([e.ids for e in backend.encode_batch(prompts)], dtype=np.int64)
    if dev_ids.shape != tuple(ids.shape) or not np.array_equal(dev_ids, ids.numpy()):
        bad = next(i for i in range(len(prompts)) if dev_ids.shape != tuple(ids.shape) or
                   not np.array_equal(dev_ids[i], ids[i].numpy()))  # fmt: skip
        raise ExportError(f"{parts.tokenizer}: the tokenizers package tokenizes prompt {prompts[bad][:40]!r} "
                          "differently from transformers; the device could not reproduce the text conditioning")  # fmt: skip
    enc = load_text_encoder(parts)
    vae = load_vae(parts)
    log.info("exporting the float text encoder and VAE decoder")
    enc_data = _export(_Encoder(enc), (ids[:1],), tmp / "text" / "text_encoder.onnx", ["input_ids"],
                       "encoder_hidden_states", opset, external)  # fmt: skip
    c, h, w = model.sample_shape
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(2, c, h, w, generator=gen)  # (2, C, h, w)
    dec = _Decoder(vae)
    vae_data = _export(dec, (lat[:1],), tmp / "vae" / "vae_decoder.onnx", ["latents"], "image", opset, external)
    with torch.no_grad():
        ref_states = enc(input_ids=ids)[0].numpy()  # (R, L, D)
        ref_img = dec(lat).numpy()  # (2, 3, H, W)
    got_states = _ort(tmp / "text" / "text_encoder.onnx", {"input_ids": ids.numpy()})
    got_img = _ort(tmp / "vae" / "vae_decoder.onnx", {"latents": lat.numpy()})
    check = {"text_encoder_rel_err": _rel_err(got_states, ref_states), "vae_decoder_rel_err": _rel_err(got_img, ref_img),
             "tolerance": TOLERANCE, "prompts": len(prompts), "latents": int(lat.shape[0])}  # fmt: skip
    for key in ("text_encoder_rel_err", "vae_decoder_rel_err"):
        if not check[key] <= TOLERANCE:
            raise ExportError(f"the ONNX {key.split('_rel')[0]} differs from torch by {check[key]:.2e} (relative, "
                              f"limit {TOLERANCE}); the float graph is wrong, report it with the pipeline's config")  # fmt: skip
    log.info("text parts: encoder rel err %.1e, VAE decoder rel err %.1e", check["text_encoder_rel_err"],
             check["vae_decoder_rel_err"])  # fmt: skip
    return {
        "tokenizer": "text/tokenizer.json",
        "text_encoder": "text/text_encoder.onnx",
        "text_encoder_data": None if enc_data is None else f"text/{enc_data}",
        "vae_decoder": "vae/vae_decoder.onnx",
        "vae_decoder_data": None if vae_data is None else f"vae/{vae_data}",
        "max_length": length,
        "hidden_size": int(ref_states.shape[-1]),
        "image_shape": list(ref_img.shape[1:]),
        "scaling_factor": dec.scale,
        "classes": {"text_encoder": type(enc).__name__, "vae": type(vae).__name__},
        "check": check,
    }


__all__ = ["TOLERANCE", "write_text_parts"]
