"""Leaf vs teacher serving speed on this CPU: documents/s (SciFact corpus texts), queries/s (SciFact test
queries) and batch-1 query latency p50/p95, through PyTorch (sentence-transformers) and through ONNX Runtime
(leaf_ray.onnx_export) with the exporter's graph ("onnx") and with onnxruntime's fused operators ("onnx-fused"),
for a trained student and the teacher its manifest names.

    python bench/serving.py runs/leaf-ir-cpu/student [--docs 256] [--queries 300] [--rounds 3] [--max-length N]

Before timing, the ONNX vectors are checked against the PyTorch ones (max abs difference, min cosine); a
mismatch stops the run. All six encoders (teacher/student x three paths) run in one measure_encoders call:
alternating rounds after a warm-up (more of them for the seconds-long queries pass), torch and onnxruntime with
the same threads, each rate the median of its rounds. By default each model truncates at its own max length;
`--max-length N` truncates both at N, so a speed-up is not partly the shorter model reading fewer tokens.
`docs_speedup` / `queries_speedup` = student / teacher, each on its faster path. The physical-limit section
puts each path's useful FLOPs per second (from the encoder shapes and the texts' measured token counts)
against this machine's measured matmul throughput, and a profiled pass of each ONNX path over the queries
says where their time goes (tokenising, onnxruntime kernels by operator). Writes bench/results/serving.json and
serving.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from leaf_ray.bench import EncoderShape, matmul_gflops, measure_encoders, token_counts
from leaf_ray.config import DEFAULT_CONFIG, load_config
from leaf_ray.evaluate import load_beir, resolve_teacher, student_prompts
from leaf_ray.onnx_export import OnnxEncoder, export_onnx
from leaf_ray.student import count_parameters, load_student, teacher_parameter_count

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"docs_speedup": 6.5, "queries_speedup": 7.3, "params_ratio": 4.7,
         "query_latency_ms": {"teacher": 73, "student": 11},
         "source": "LEAF (arXiv 2509.12539): arctic-embed-m-v1.5 -> leaf-ir on a 2-vCPU machine, ONNX Runtime"}
MIN_COSINE = 0.9999  # ONNX and PyTorch must give the same vectors (fp32 kernels differ only in rounding)
PATHS = ("pytorch", "onnx", "onnx-fused")
ONNX_PATHS = {"onnx": False, "onnx-fused": True}  # path -> export_onnx(fuse=...)
MATMUL_ROWS = 4096  # tokens per representative matmul: one batch of 32 texts of 128 tokens


def sample_texts(folder: Path, split: str, docs: int, queries: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded sample of `docs` corpus texts (title + abstract) and the split's first `queries` queries."""
    data = load_beir(folder, split)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(data.corpus_texts), min(docs, len(data.corpus_texts)), replace=False)
    return [data.corpus_texts[i] for i in np.sort(picked)], data.query_texts[:queries]


def agreement(model, encoder: OnnxEncoder, texts: list[str], prompt: str) -> dict:
    """How far the ONNX vectors are from the PyTorch ones on `texts`."""
    a = model.encode(texts, prompt=prompt or None, batch_size=16, show_progress_bar=False)
    b = encoder.encode(texts, prompt=prompt or None, batch_size=16)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cosine.min()), "texts": len(texts)}


def physical_limit(models: dict, prompts: dict, documents: list[str], queries: list[str], speed: dict) -> dict:
    """FLOPs per document and per query of each model, the machine's matmul GFLOP/s at each model's
    feed-forward shape (same threads), and the fraction of it each serving path reaches."""
    out = {"flops_per_doc": {}, "flops_per_query": {}, "mean_tokens": {}, "matmul_gflops": {},
           "matmul_shape": {}, "achieved_gflops": {}, "fraction_of_limit": {}}
    for name, model in models.items():
        shape = EncoderShape.of(model)
        doc_tokens = token_counts(model, documents, prompts[name]["document"])
        query_tokens = token_counts(model, queries, prompts[name]["query"])
        per_doc, per_query = float(shape.flops(doc_tokens).mean()), float(shape.flops(query_tokens).mean())
        peak = matmul_gflops(MATMUL_ROWS, shape.hidden, shape.intermediate)
        out["flops_per_doc"][name], out["flops_per_query"][name] = per_doc, per_query
        out["mean_tokens"][name] = {"docs": float(doc_tokens.mean()), "queries": float(query_tokens.mean())}
        out["matmul_gflops"][name] = round(peak, 1)
        out["matmul_shape"][name] = [MATMUL_ROWS, shape.hidden, shape.intermediate]
        achieved = {path: {"docs": per_doc * speed[f"{name}/{path}"]["docs_per_s"] / 1e9,
                           "queries": per_query * speed[f"{name}/{path}"]["queries_per_s"] / 1e9}
                    for path in PATHS}
        out["achieved_gflops"][name] = {p: {k: round(v, 2) for k, v in a.items()} for p, a in achieved.items()}
        out["fraction_of_limit"][name] = {p: {k: round(v / peak, 3) for k, v in a.items()} for p, a in achieved.items()}
    out["flops_ratio"] = {"docs": out["flops_per_doc"]["teacher"] / out["flops_per_doc"]["student"],
                          "queries": out["flops_per_query"]["teacher"] / out["flops_per_query"]["student"]}
    out["note"] = ("useful FLOPs only (real tokens; padding, embeddings, norms and softmax not counted); "
                   "flops_ratio is the speedup a student would get at the teacher's efficiency")
    return out


def query_time_breakdown(directory: Path, queries: list[str], prompt: str | None, threads: int,
                         batch_size: int) -> dict:
    """Where an ONNX path's query time goes, from one profiled pass over the queries: the share spent
    tokenising, the share in onnxruntime kernels, and the kernel time per operator type (largest first)."""
    encoder = OnnxEncoder(directory, threads=threads, profile_prefix=str(directory / "profile"))
    texts = [(prompt or "") + query for query in queries]
    # Both timed in the same pass: a second, tokenize-only pass could outlast the whole first one on a busy machine.
    tokenize = total = 0.0
    for start in range(0, len(texts), batch_size):
        began = time.perf_counter()
        features = encoder.tokenize(texts[start:start + batch_size])
        tokenized = time.perf_counter()
        encoder.session.run(None, features)
        tokenize += tokenized - began
        total += time.perf_counter() - began
    kernels: dict[str, float] = {}
    for event in json.loads(Path(encoder.session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            kernels[op] = kernels.get(op, 0.0) + event["dur"] / 1e6
    kernel_total = sum(kernels.values())
    return {"total_s": round(total, 3), "tokenize_share": round(tokenize / total, 3),
            "kernel_share": round(kernel_total / total, 3),
            "op_shares": {op: round(t / kernel_total, 3) for op, t in sorted(kernels.items(), key=lambda kv: -kv[1])
                          if t / kernel_total >= 0.005}}


def best_paths(speed: dict) -> dict:
    """Per model and kind, the faster serving path and its rate."""
    best = {}
    for name in ("teacher", "student"):
        for kind, key in (("docs", "docs_per_s"), ("queries", "queries_per_s")):
            path = max(PATHS, key=lambda p: speed[f"{name}/{p}"][key])
            best.setdefault(name, {})[kind] = {"path": path, "per_s": speed[f"{name}/{path}"][key]}
    return best


def plot(report: dict, path: Path) -> None:
    """Docs/s, queries/s and p50 latency per model and path, with the paper's speedups in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = report["speed"]
    panels = (("docs_per_s", "documents / s"), ("queries_per_s", "queries / s"),
              ("query_latency_p50_ms", "batch-1 query latency p50 (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(PATHS))
    for ax, (key, label) in zip(axes, panels):
        for offset, name, colour in ((-0.2, "teacher", "tab:gray"), (0.2, "student", "tab:green")):
            values = [speed[f"{name}/{p}"][key] for p in PATHS]
            bars = ax.bar(x + offset, values, 0.4, label=name, color=colour)
            ax.bar_label(bars, fmt="{:.4g}", fontsize=8)
        ax.set_xticks(x, PATHS)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[2].legend(loc="upper right")  # the student's latency bars are the low ones
    fig.suptitle(f"student / teacher: docs {report['docs_speedup']:.2f}x, queries {report['queries_speedup']:.2f}x "
                 f"at {report['params']['ratio']:.2f}x fewer parameters "
                 f"(paper: {PAPER['docs_speedup']}x, {PAPER['queries_speedup']}x at {PAPER['params_ratio']}x)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: dict) -> None:
    limit = report["physical_limit"]["fraction_of_limit"]
    print(f"\n{'encoder':<18}{'docs/s':>10}{'queries/s':>11}{'p50 ms':>9}{'p95 ms':>9}{'docs % CPU':>12}")
    for key, row in report["speed"].items():
        name, path = key.split("/")
        print(f"{key:<18}{row['docs_per_s']:>10.2f}{row['queries_per_s']:>11.1f}{row['query_latency_p50_ms']:>9.1f}"
              f"{row['query_latency_p95_ms']:>9.1f}{100 * limit[name][path]['docs']:>11.1f}%")
    print(f"docs_speedup {report['docs_speedup']:.2f}x (paper {PAPER['docs_speedup']}x), queries_speedup "
          f"{report['queries_speedup']:.2f}x (paper {PAPER['queries_speedup']}x), params "
          f"{report['params']['ratio']:.2f}x fewer (paper {PAPER['params_ratio']}x)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="trained student directory (its leaf_manifest.json names the teacher)")
    parser.add_argument("--teacher", help="teacher id or path (default: the manifest's)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config for data and model roots")
    parser.add_argument("--dataset", default="scifact", help="BEIR folder under the data root (or absolute)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--docs", type=int, default=256, help="corpus texts timed per round")
    parser.add_argument("--queries", type=int, default=300, help="queries timed per round (SciFact test has 300)")
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, help="truncate teacher and student at this many tokens "
                        "(default: each model's own)")
    parser.add_argument("--query-rounds", type=int, default=6, help="alternating rounds of the queries/s pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    parser.add_argument("--check-texts", type=int, default=32, help="texts per kind in the ONNX agreement check")
    parser.add_argument("--work", help="folder for the ONNX exports (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS / "serving.json"), help="result JSON (a PNG is written beside)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    torch.set_num_threads(args.threads)
    teacher_cfg = resolve_teacher(Path(args.student), args.teacher, cfg.teacher)
    store = cfg.model_store()
    teacher = store.load(teacher_cfg.model, max_length=teacher_cfg.max_length,
                         trust_remote_code=teacher_cfg.trust_remote_code,
                         allow_pickle_weights=teacher_cfg.allow_pickle_weights)
    student = load_student(args.student)
    models = {"teacher": teacher, "student": student}
    for model in models.values() if args.max_length else ():
        model.max_seq_length = args.max_length
    prompts = {"teacher": {"query": teacher_cfg.query_prompt, "document": teacher_cfg.document_prompt},
               "student": student_prompts(student, teacher_cfg)}
    documents, queries = sample_texts(cfg.data.resolve_path(args.dataset), args.split, args.docs, args.queries, 0)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="leaf-serving-"))
    encoders, checks, export_s, fusions, breakdown = {}, {}, {}, {}, {}
    for name, model in models.items():
        encoders[f"{name}/pytorch"] = model
        for path, fuse in ONNX_PATHS.items():
            key = f"{name}/{path}"
            started = time.perf_counter()
            onnx = OnnxEncoder(export_onnx(model, work / name / path, fuse=fuse), threads=args.threads)
            export_s[key], fusions[key] = round(time.perf_counter() - started, 1), onnx.fusions
            checks[key] = {kind: agreement(model, onnx, texts[:args.check_texts], prompts[name][kind])
                           for kind, texts in (("query", queries), ("document", documents))}
            worst = min(c["min_cosine"] for c in checks[key].values())
            if worst < MIN_COSINE:
                raise SystemExit(f"{key}: ONNX vectors differ from PyTorch's (min cosine {worst:.6f} < {MIN_COSINE}); "
                                 f"details {checks[key]}")
            encoders[key] = onnx
            breakdown[key] = query_time_breakdown(work / name / path, queries, prompts[name]["query"],
                                                  args.threads, args.batch_size)
    load_before = os.getloadavg()
    speed = measure_encoders(encoders, queries, documents,
                             prompts={key: prompts[key.split("/")[0]] for key in encoders},
                             rounds=args.rounds, batch_size=args.batch_size, latency_queries=args.latency_queries,
                             query_rounds=args.query_rounds)
    load_after = os.getloadavg()
    best = best_paths(speed)
    params = count_parameters(student, teacher_parameter_count(teacher_cfg, store))
    report = {
        "benchmark": "serving",
        "student": str(args.student), "teacher": teacher_cfg.model,
        "docs_speedup": round(best["student"]["docs"]["per_s"] / best["teacher"]["docs"]["per_s"], 3),
        "queries_speedup": round(best["student"]["queries"]["per_s"] / best["teacher"]["queries"]["per_s"], 3),
        "query_latency_p50_speedup": round(
            min(speed[f"teacher/{p}"]["query_latency_p50_ms"] for p in PATHS)
            / min(speed[f"student/{p}"]["query_latency_p50_ms"] for p in PATHS), 3),
        "speedup_per_path": {p: {"docs": round(speed[f"student/{p}"]["docs_per_s"] / speed[f"teacher/{p}"]["docs_per_s"], 3),
                                 "queries": round(speed[f"student/{p}"]["queries_per_s"]
                                                  / speed[f"teacher/{p}"]["queries_per_s"], 3)} for p in PATHS},
        "best_path": best,
        "params": params.as_dict(),
        "paper": PAPER,
        "speed": speed,
        "onnx_agreement": checks,
        "physical_limit": physical_limit(models, prompts, documents, queries, speed),
        "query_time_breakdown": breakdown,
        "setup": {"dataset": Path(args.dataset).name, "split": args.split, "documents": len(documents), "queries": len(queries),
                  "latency_queries": min(args.latency_queries, len(queries)), "rounds": args.rounds,
                  "query_rounds": args.query_rounds,
                  "batch_size": args.batch_size, "threads": args.threads, "prompts": prompts,
                  "max_length": {n: int(m.max_seq_length) for n, m in models.items()}, "onnx_export_s": export_s,
                  "onnx_fusions": fusions,
                  "max_length_rule": f"both at {args.max_length}" if args.max_length else "each model's own",
                  "rates": "median of alternating rounds after a warm-up (start-up excluded); latency alternates "
                           "per block of queries"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "loadavg_before": load_before, "loadavg_after": load_after},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print_table(report)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
