"""leaf-ray against the tools people use today, on the same teacher, data and budget as a leaf-ray config:

- sentence-transformers' own distillation recipe: SentenceTransformerTrainer + MSELoss on the same cached
  teacher vectors, from the same initial student (leaf-ray's init_student, lstsq head included), the same
  prompted texts, number of steps, batch size, lr, warmup, weight decay and gradient clipping;
- leaf-ray's train_student on Ray Train with that config;
- Model2Vec: `model2vec.distill` of the teacher from its local directory (a static embedding table, in its
  own PCA space, so asymmetric retrieval against teacher documents is impossible for it).

    python bench/peers.py [--config configs/quickstart.yaml] [--work DIR] [--train-rounds 2] [key=value ...]

One process. The two trainings run in `--train-rounds` rounds of alternating order (leaf-ray first, then
sentence-transformers first, ...), each round from the same initial student into folders of its own; then
Model2Vec (load averages recorded around each). Wall times cover what a user runs after the teacher vectors
exist: leaf-ray's train_student call (Ray Train start-up, training, validations, checkpoints, export) and the
sentence-transformers recipe (dataset, trainer, training, save); the wall-time ratio is the median of the
per-round ratios, start-up included. Quality is scored on the first round's students. The teacher vectors (the
config's cache, reused when present) and the initial student are built once before both and reported apart.
Both trained students and Model2Vec are then scored on the config's first evaluation dataset (nDCG@10, full
dimension, float32; standard = student queries and documents, asymmetric = student queries against teacher
documents from the teacher cache), and Model2Vec's serving speed is measured side by side with the teacher and
the leaf. Writes bench/results/peers.json + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leaf_ray.bench import alternating, measure_encoders, median_ratios
from leaf_ray.config import DEFAULT_CONFIG, RunConfig, load_config, with_values
from leaf_ray.data import build_mix
from leaf_ray.inputs import collect, training_inputs
from leaf_ray.evaluate import (
    MODES,
    beir_dataset,
    evaluate_retrieval,
    student_prompts,
)
from leaf_ray.recipe import LeafRun
from leaf_ray.runs import RunFolder
from leaf_ray.runtime import init_ray
from leaf_ray.student import TeacherRows, load_student, prompted_texts
from leaf_ray.train import (
    evaluate,
    prepare_initial_student,
    total_steps,
    train_student,
    worker_threads,
)

RESULTS = Path(__file__).resolve().parent / "results"
ST_SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup", "cyclic_linear": "linear"}
ASYMMETRIC_NOTE = ("Model2Vec embeds in its own (PCA-reduced) space, not the teacher's: its query vectors cannot be "
                   "compared with teacher document vectors, so asymmetric retrieval is impossible for it")


def batching(train) -> str:
    """How leaf-ray cut and padded its batches, in words for the report."""
    cut = "length-grouped batches" if train.length_group_batches > 1 else "random batches"
    return cut + (f" padded in {train.padding_buckets} length buckets" if train.padding_buckets > 1 else "")


def timed(function, *args, **kwargs):
    """(result, seconds, load average before and after): what every peer is reported with."""
    load_before, started = os.getloadavg()[0], time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - started, 2), {"before": round(load_before, 2),
                                                            "after": round(os.getloadavg()[0], 2)}


def round_config(cfg: RunConfig, index: int, init_dir: Path) -> RunConfig:
    """leaf-ray's config for timing round `index`: a run folder of its own (a finished run would be resumed, not
    trained) that starts from the first round's initial student, copied, so no round pays for building one."""
    if index == 0:
        return cfg
    again = with_values(cfg, {"name": f"{cfg.name}-r{index}"})
    shutil.copytree(init_dir, Path(RunFolder(again).path) / "init_student")
    return again


def st_recipe(cfg: RunConfig, init_dir: Path, train, steps: int, out_dir: Path) -> Path:
    """sentence-transformers' distillation recipe (MSELoss against precomputed teacher vectors in a `label`
    column), from leaf-ray's initial student, with leaf-ray's budget. Returns the saved student."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MSELoss

    tc = cfg.train
    model = load_student(init_dir)
    rows = TeacherRows.of(train)
    dataset = Dataset.from_dict({"text": prompted_texts(model, rows.texts, rows.kinds), "label": rows.vectors})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=steps, per_device_train_batch_size=tc.batch_size,
        learning_rate=tc.lr, warmup_steps=tc.warmup_steps, lr_scheduler_type=ST_SCHEDULES[tc.schedule],
        weight_decay=tc.weight_decay, max_grad_norm=tc.grad_clip or 0.0, seed=tc.seed, data_seed=tc.seed,
        save_strategy="no", report_to="none", logging_steps=tc.log_every_steps, disable_tqdm=True, use_cpu=True,
        dataloader_drop_last=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=MSELoss(model)).train()
    model.save(str(out_dir / "student"), safe_serialization=True, create_model_card=False)
    return out_dir / "student"


def model2vec_distill(cfg: RunConfig, out_dir: Path):
    """Model2Vec's distillation of the teacher (its defaults: 256 PCA dims, SIF weights, float16), saved."""
    from model2vec.distill import distill

    teacher = cfg.model_store().resolve(cfg.teacher.model)
    model = distill(model_name=str(teacher), device="cpu", trust_remote_code=cfg.teacher.trust_remote_code)
    model.save_pretrained(str(out_dir))
    return model


def ndcg(data, sources, modes) -> dict[str, float]:
    """nDCG@10 per mode at the full dimension, float32."""
    records = evaluate_retrieval(data, sources, modes=modes, progress=False)
    return {r["mode"]: r["value"] for r in records if r["metric"] == "ndcg_at_10"}


def student_scores(run: LeafRun, data, student_path: Path) -> dict[str, float]:
    """A LEAF-space student's nDCG@10: teacher, standard (student/student) and asymmetric (student queries,
    teacher documents from the teacher cache)."""
    scores = ndcg(data, run.sources(student_path), MODES)
    return {"teacher": scores["teacher"], "standard": scores["student"], "asymmetric": scores["asymmetric"]}


def model2vec_scores(data, model) -> dict:
    def source(texts, ids, kind):
        return model.encode(texts, show_progress_bar=False)

    return {"standard": ndcg(data, {"student": source}, {"student": ("student", "student")})["student"],
            "asymmetric": None}


def plot(report: dict, path: Path) -> None:
    """nDCG@10 (standard and asymmetric) against the wall time to make each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, row) in enumerate(report["results"].items()):
        seconds = row.get("wall_s", row.get("distill_s"))
        for mode, marker in (("standard", "o"), ("asymmetric", "^")):
            if row["ndcg_at_10"].get(mode) is not None:
                ax.scatter(seconds, row["ndcg_at_10"][mode], marker=marker, s=60, color=f"C{index}")
                ax.annotate(f"{name} ({mode})", (seconds, row["ndcg_at_10"][mode]), fontsize=8,
                            xytext=(5, 3), textcoords="offset points")
    longest = max(row.get("wall_s", row.get("distill_s")) for row in report["results"].values())
    ax.set_xlim(0, longest * 1.45)  # room for the labels of the rightmost points
    ax.axhline(report["teacher"]["ndcg_at_10"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("wall time to make the model (s)")
    ax.set_ylabel(f"{report['setup']['dataset']} nDCG@10")
    ax.set_title(f"peers on teacher {Path(report['teacher']['model']).name} (o standard, ^ asymmetric)", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: dict) -> None:
    print(f"\n{'peer':<24}{'make s':>9}{'val cos':>9}{'nDCG std':>10}{'nDCG asym':>11}{'docs/s':>9}{'queries/s':>11}")
    for name, row in report["results"].items():
        speed = report["speed"].get(row.get("speed_key", ""), {})
        asym = row["ndcg_at_10"]["asymmetric"]
        print(f"{name:<24}{row.get('wall_s', row.get('distill_s')):>9.1f}{row.get('val_cosine') or float('nan'):>9.4f}"
              f"{row['ndcg_at_10']['standard']:>10.4f}{'n/a' if asym is None else f'{asym:.4f}':>11}"
              f"{speed.get('docs_per_s', float('nan')):>9.1f}{speed.get('queries_per_s', float('nan')):>11.1f}")
    print(f"teacher nDCG@10 {report['teacher']['ndcg_at_10']:.4f}; goal {report['goal']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the leaf-ray run config to compare on")
    parser.add_argument("--work", help="new or empty folder for the trained peers (default: a new temporary one)")
    parser.add_argument("--docs", type=int, default=128, help="corpus texts per round of the speed measurement")
    parser.add_argument("--queries", type=int, default=300, help="queries per round of the speed measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the serving-speed measurement")
    parser.add_argument("--train-rounds", type=int, default=2, help="alternating rounds of the two trainings")
    parser.add_argument("--out", default=str(RESULTS / "peers.json"), help="result JSON (a PNG is written beside)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=1")
    args = parser.parse_args(argv)
    import ray

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="leaf-peers-"))
    if work.is_dir() and any(work.iterdir()):  # leaf-ray would resume the run found there instead of training
        raise SystemExit(f"--work {work} is not empty: give a new folder so both peers train from scratch")
    base = load_config(args.config, args.overrides)
    cfg = with_values(base, {"name": f"{base.name}-peers", "storage.runs_root": str(work / "runs")})
    if cfg.train.mode != "cache":
        raise SystemExit(f"train.mode is {cfg.train.mode!r}: bench/peers.py compares on cached teacher vectors "
                         "(train.mode=cache)")
    torch.set_num_threads(worker_threads(cfg.train))  # the in-process peers get the leaf-ray workers' threads
    joined = init_ray(cfg.ray)

    texts, _ = build_mix(cfg.data)
    inputs, teacher_s, _ = timed(training_inputs, cfg, texts)
    steps = total_steps(cfg.train, inputs.train_rows)
    init_dir, init_s, _ = timed(prepare_initial_student, cfg, inputs.teacher_dim, inputs.train)
    train_rows = collect(inputs.train)  # sentence-transformers' trainer holds its data in memory
    init_dir = Path(init_dir.native())  # runs_root is the local work folder
    val = TeacherRows.of(inputs.val)
    init_val = evaluate(load_student(init_dir), val, cfg.train.loss)  # what both peers start from

    rounds, first = {"leaf-ray": [], "sentence-transformers": []}, {}
    for index in range(args.train_rounds):
        for name in alternating(list(rounds), index):
            if name == "leaf-ray":
                made, seconds, load = timed(train_student, round_config(cfg, index, init_dir), inputs)
            else:
                made, seconds, load = timed(st_recipe, cfg, init_dir, train_rows, steps,
                                            work / f"sentence-transformers-r{index}")
            rounds[name].append({"round": index, "wall_s": seconds, "loadavg": load})
            first.setdefault(name, made)
    trained, st_path = first["leaf-ray"], first["sentence-transformers"]
    leaf_s, st_s = (float(np.median([r["wall_s"] for r in rounds[name]])) for name in rounds)
    st_over_leaf = median_ratios(rounds, "leaf-ray", "wall_s")["sentence-transformers"]
    st_val = evaluate(load_student(st_path), val, cfg.train.loss)
    static, m2v_s, m2v_load = timed(model2vec_distill, cfg, work / "model2vec")

    dataset = cfg.evaluate.datasets[0]
    data = beir_dataset(cfg.data, dataset, cfg.evaluate.split, cfg.evaluate.max_corpus,
                        cfg.evaluate.max_queries, cfg.evaluate.seed)
    run = LeafRun(cfg)
    leaf_scores = student_scores(run, data, trained.student_path)
    st_scores = student_scores(run, data, st_path)

    teacher = run.models.load(cfg.teacher.model, max_length=cfg.teacher.max_length)
    leaf = load_student(trained.student_path)
    prompts = {"teacher": {"query": cfg.teacher.query_prompt, "document": cfg.teacher.document_prompt},
               "leaf-ray": student_prompts(leaf, cfg.teacher)}
    rng = np.random.default_rng(0)
    documents = [data.corpus_texts[i] for i in np.sort(rng.choice(len(data.corpus_texts),
                                                                  min(args.docs, len(data.corpus_texts)), replace=False))]
    speed = measure_encoders({"teacher": teacher, "leaf-ray": leaf, "model2vec": static}, data.query_texts[:args.queries],
                             documents, prompts=prompts, rounds=args.rounds)

    common = {"steps": steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr}
    results = {
        "leaf-ray": {"wall_s": leaf_s, "rounds": rounds["leaf-ray"], **common, "steps_trained": trained.steps,
                     "val_cosine": trained.metrics.get("val_cosine"), "ndcg_at_10": {k: leaf_scores[k] for k in
                                                                                    ("standard", "asymmetric")},
                     "samples_per_s": trained.samples_per_s, "speed_key": "leaf-ray",
                     "recipe": f"leaf_ray.train.train_student ({cfg.train.loss} loss, {cfg.train.schedule} schedule, "
                               f"{cfg.train.num_workers} Ray Train worker(s), {batching(cfg.train)})"},
        "sentence-transformers": {"wall_s": st_s, "rounds": rounds["sentence-transformers"], **common,
                                  "val_cosine": st_val["val_cosine"],
                                  "ndcg_at_10": {k: st_scores[k] for k in ("standard", "asymmetric")},
                                  "speed_key": "leaf-ray",  # the same architecture as leaf-ray's student
                                  "recipe": "SentenceTransformerTrainer + losses.MSELoss on the teacher vectors "
                                            f"({ST_SCHEDULES[cfg.train.schedule]} schedule, random batches; "
                                            "MSE = leaf-ray's l2 / dim, the same minimiser)"},
        "model2vec": {"distill_s": m2v_s, "loadavg": m2v_load, "dim": int(static.dim),
                      "ndcg_at_10": model2vec_scores(data, static), "asymmetric_note": ASYMMETRIC_NOTE,
                      "speed_key": "model2vec", "recipe": "model2vec.distill(teacher dir) with its defaults"},
    }
    report = {
        "benchmark": "peers",
        "config": str(args.config), "overrides": args.overrides,
        "teacher": {"model": cfg.teacher.model, "ndcg_at_10": leaf_scores["teacher"]},
        "setup": {"dataset": data.name, "split": cfg.evaluate.split, "documents": len(data.corpus_ids),
                  "queries": len(data.query_ids), "train_rows": inputs.train_rows, "val_rows": len(val),
                  "student": cfg.student.model_dump(), "train": cfg.train.model_dump(), "threads":
                      worker_threads(cfg.train), "speed_docs": len(documents), "speed_rounds": args.rounds},
        "shared": {"teacher_vectors_s": teacher_s, "init_student_s": init_s,
                   "init_val_cosine": init_val["val_cosine"],
                   "note": "teacher vectors (the config's cache, reused when complete) and leaf-ray's initial student "
                           "are made once and used by both trained peers; not in their wall times"},
        "results": results,
        "wall_time": {"st_over_leaf_median_per_round": st_over_leaf, "train_rounds": args.train_rounds,
                      "rule": "wall_s is each side's median over rounds, start-up included; the ratio is the median "
                              "of per-round ratios; rounds alternate which side goes first"},
        "goal": {"leaf_wall_le_st": st_over_leaf >= 1,
                 "leaf_ndcg_ge_st": {k: leaf_scores[k] >= st_scores[k] for k in ("standard", "asymmetric")}},
        "speed": speed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot(report, out.with_suffix(".png"))
    print_table(report)
    print(f"wrote {out} and {out.with_suffix('.png')} (trained peers in {work})")
    if joined != "already-initialized":  # a caller's Ray (a test's, a notebook's) stays up
        ray.shutdown()
    return report


if __name__ == "__main__":
    main()
