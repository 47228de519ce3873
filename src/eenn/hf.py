"""Hugging Face encoders as models with one input, ready for :func:`eenn.attach_exits`.

A ``transformers`` classifier takes keyword inputs (``input_ids``, ``attention_mask`` or
``pixel_values``) and returns a ``ModelOutput``; :func:`encoder` wraps it as an ``nn.Module``
that takes one tensor (token ids, the attention mask derived from the pad id, or pixels) and
returns the logits. The wrapper holds the model's own submodules under their own names, so
cut points are named as in the model (``bert.encoder.layer.1``; ``vit.encoder.layer.2`` in
transformers 4; ``[n for n, _ in model.named_modules()]`` lists them) and its state dict is the
model's. Hugging Face code branches on shapes in Python, which
``torch.fx`` cannot trace; the wrapper asks attach_exits to trace it with ``torch.export``::

    net = eenn.attach_exits(eenn.hf.encoder(bert, pad_token_id=0),
                            at=["bert.encoder.layer.1", "bert.encoder.layer.2"],
                            input_shape=(16,), input_dtype=torch.long)

Such a network exports to staged ONNX (:func:`eenn.export`) with a dynamic batch dimension, as
any cut network does. The sequence length (the image size) stays the one in ``input_shape``, in
PyTorch and in ONNX alike: pad shorter token sequences with the pad id.

``transformers`` is optional (``pip install eenn[hf]``); this module does not import it.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["HFEncoder", "encoder"]


class HFEncoder(nn.Module):
    """``model`` (a Hugging Face ``...ForSequenceClassification`` / ``...ForImageClassification``)
    as a module ``x -> logits``; see :func:`encoder`."""

    eenn_tracer = "export"  # the tracer attach_exits uses for it

    def __init__(self, model: nn.Module, pad_token_id: int | None = None) -> None:
        super().__init__()
        if not hasattr(model, "config") or not callable(model):
            raise TypeError(f"eenn.hf.encoder needs a transformers PreTrainedModel, got {type(model).__name__}")
        for name, child in model.named_children():  # the model's own names, parameters shared
            self.add_module(name, child)
        object.__setattr__(self, "model", model)  # called, not registered a second time
        self.input_name = getattr(model, "main_input_name", "input_ids")
        self.pad_token_id = pad_token_id
        if pad_token_id is not None and self.input_name != "input_ids":
            raise ValueError(f"pad_token_id applies to token-id models; {type(model).__name__} takes {self.input_name}")
        self.training = model.training

    @property
    def eenn_pad_id(self) -> int | None:
        """What attach_exits takes as its ``pad_id``: exit heads then leave padded tokens out."""
        return self.pad_token_id

    def train(self, mode: bool = True) -> "HFEncoder":
        super().train(mode)
        self.model.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        inputs = {self.input_name: x}
        if self.pad_token_id is not None:
            inputs["attention_mask"] = (x != self.pad_token_id).long()
        out = self.model(**inputs)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TypeError(f"{type(self.model).__name__} returns no logits: wrap a model with a classification "
                            "head (e.g. BertForSequenceClassification, ViTForImageClassification)")
        return logits

    def extra_repr(self) -> str:
        return f"{type(self.model).__name__}, input={self.input_name}, pad_token_id={self.pad_token_id}"


def encoder(model: nn.Module, *, pad_token_id: int | None = None) -> HFEncoder:
    """``model`` as a module that takes one tensor and returns logits: token ids ``[B, L]``
    (with ``pad_token_id``, the attention mask is ``ids != pad_token_id``, and the exit heads
    :func:`eenn.attach_exits` puts on it leave padded tokens out too; without, every token is
    attended to) or, for a vision model, pixels ``[B, C, H, W]``."""
    return HFEncoder(model, pad_token_id)
