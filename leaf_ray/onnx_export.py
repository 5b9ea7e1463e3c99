"""ONNX Runtime serving of a sentence-transformers encoder (a leaf or its teacher).

`export_onnx` writes the whole embedding pipeline (transformer -> mean pooling -> Dense -> Normalize) as one
ONNX graph, traced with torch.onnx (the torch.export-based exporter) with dynamic batch and sequence axes, next
to the model's tokenizer.json and `leaf_onnx.json` (max length, prompts, padding token, graph inputs). By default
the graph is then rewritten with onnxscript's onnxruntime fusions (Attention, SkipLayerNormalization, BiasGelu):
on 2 CPU cores a small encoder's short queries spend much of their time in the many small ops of unfused
attention, and the fused kernels made a MiniLM leaf ~10% faster on queries and ~27% on documents (bench/serving.py
measures both graphs).
`OnnxEncoder` serves that directory with onnxruntime and the `tokenizers` library only (no torch), and its
`encode` takes the arguments of SentenceTransformer.encode that serving uses, so the two paths are drop-in
replacements for each other. Tokenisation matches sentence-transformers': the prompt is prefixed to the text,
truncation at the model's max_seq_length, padding to the longest text of a batch, texts batched longest first.
It earns its place twice: serving without torch, and sentence-transformers' own `backend="onnx"` needs
optimum-onnx, whose release does not import with transformers 5 (docs/serving.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from leaf_ray.errors import LeafRayError

ONNX_CONFIG = "leaf_onnx.json"
MODEL_FILE = "model.onnx"
UNFUSED_FILE = "unfused.onnx"  # the exporter's graph, removed once the fused one is written
GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what BERT-like tokenizers produce


class OnnxExportError(LeafRayError, ValueError):
    """A model the ONNX path cannot reproduce; the message names the module or setting."""


def _check_exportable(model) -> None:
    """Only the pieces whose ONNX graph we verify: Transformer, mean/cls/max Pooling over every token, Dense,
    Normalize."""
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )

    modules = list(model)
    if not modules or not isinstance(modules[0], Transformer):
        raise OnnxExportError(f"the first module must be a Transformer, got {type(modules[0]).__name__}")
    for module in modules[1:]:
        if not isinstance(module, (Pooling, Dense, Normalize)):
            raise OnnxExportError(f"module {type(module).__name__} is not supported (Pooling, Dense, Normalize are)")
        if isinstance(module, Pooling) and not module.include_prompt:
            raise OnnxExportError("Pooling(include_prompt=False) needs the prompt length at run time; "
                                  "the ONNX path pools over every token")


def _graph_module(model, input_names: tuple[str, ...]):
    """The SentenceTransformer's modules run in order on named tensors: what the ONNX graph computes."""
    import torch

    class EmbeddingGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList(list(model))

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "token_type_ids" in input_names:
                features["token_type_ids"] = token_type_ids
            for stage in self.stages:
                features = stage(features)
            return features["sentence_embedding"]

    return EmbeddingGraph().eval()


def _fuse_for_onnxruntime(source: Path, target: Path) -> dict[str, int]:
    """Rewrite the exported graph at `source` into `target` (weights in target + '.data') with onnxruntime's
    fused operators; returns how often each fusion applied. The result runs on onnxruntime only."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    graph = ir.load(source)
    onnxscript.optimizer.optimize(graph)  # constant folding and shape cleanup expose the fusion patterns
    graph, counts = optimize_for_ort(graph)
    ir.save(graph, target, external_data=target.name + ".data")
    return {name: int(count) for name, count in counts.items() if count}


def export_onnx(model, out_dir: str | Path, fuse: bool = True) -> Path:
    """Write `model` (a loaded SentenceTransformer) as an ONNX serving directory: model.onnx, tokenizer.json
    and leaf_onnx.json. `fuse` rewrites the graph with onnxruntime's fused operators. Returns the directory."""
    import torch

    _check_exportable(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = model.preprocess(["a short query", "a somewhat longer document text to pad the other one"])
    input_names = tuple(name for name in GRAPH_INPUTS if name in sample)
    unknown = sorted(k for k, v in sample.items() if torch.is_tensor(v) and k not in GRAPH_INPUTS)
    if unknown:
        raise OnnxExportError(f"the tokenizer produces inputs {unknown} the ONNX graph does not take")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    graph_path = out_dir / (UNFUSED_FILE if fuse else MODEL_FILE)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(_graph_module(model, input_names), (), str(graph_path),
                              kwargs={name: sample[name] for name in input_names},
                              input_names=list(input_names), output_names=["sentence_embedding"],
                              dynamic_shapes={name: {0: batch, 1: seq} for name in input_names},
                              dynamo=True, verbose=False)
    finally:
        model.train(was_training)
    fusions = {}
    if fuse:
        fusions = _fuse_for_onnxruntime(graph_path, out_dir / MODEL_FILE)
        for leftover in (graph_path, graph_path.with_name(graph_path.name + ".data")):
            leftover.unlink(missing_ok=True)
    tokenizer = model.tokenizer
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"max_length": int(model.max_seq_length), "input_names": list(input_names),
              "pad_token": tokenizer.pad_token, "pad_id": int(tokenizer.pad_token_id),
              "prompts": dict(model.prompts or {}), "dim": int(model.get_embedding_dimension()),
              "fusions": fusions}
    (out_dir / ONNX_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


class OnnxEncoder:
    """An exported directory served by onnxruntime on CPU, `threads` intra-op threads (default: all cores).
    With `profile_prefix`, onnxruntime records every kernel's time; `session.end_profiling()` returns the JSON
    file (what bench/serving.py reads to say where the time goes)."""

    def __init__(self, directory: str | Path, threads: int | None = None, profile_prefix: str | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        directory = Path(directory)
        config_path = directory / ONNX_CONFIG
        if not config_path.is_file():
            raise OnnxExportError(f"{directory}: no {ONNX_CONFIG}; write the directory with export_onnx")
        config = json.loads(config_path.read_text())
        self.prompts: dict[str, str] = config["prompts"]
        self.dim: int = config["dim"]
        self.fusions: dict[str, int] = config.get("fusions", {})
        self._inputs = config["input_names"]
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.enable_truncation(config["max_length"])
        self._tokenizer.enable_padding(pad_id=config["pad_id"], pad_token=config["pad_token"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        self.session = ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch: truncated at max length, padded to the longest text."""
        encodings = self._tokenizer.encode_batch(texts)
        columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                   "token_type_ids": [e.type_ids for e in encodings]}
        return {name: np.asarray(columns[name], dtype=np.int64) for name in self._inputs}

    def _run(self, texts: list[str]) -> np.ndarray:
        return self.session.run(None, self.tokenize(texts))[0]

    def encode(self, sentences, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
               show_progress_bar: bool = False, convert_to_numpy: bool = True,
               normalize_embeddings: bool = False) -> np.ndarray:
        """float32 [len(sentences), dim], like SentenceTransformer.encode (a str gives one vector)."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise OnnxExportError(f"prompt_name {prompt_name!r} is not one of {sorted(self.prompts)}")
            prompt = self.prompts[prompt_name]
        if prompt:
            texts = [prompt + text for text in texts]
        order = np.argsort([-len(text) for text in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._run([texts[i] for i in rows])
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out
