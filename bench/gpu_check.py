"""What the LEAF recipe needs from one GPU, checked and measured on that GPU, and what the paper's recipe
would cost at the measured speeds.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--tiny]

The GPU machines this is meant for have torch and transformers but no Ray, no network and only a small
upload, so the script imports nothing from leaf_ray (the package pulls in Ray) and builds its models with
random weights at the real shapes: speed does not depend on the weights, and the precision check compares a
model with itself in other dtypes. Random weights cannot show the fp16 overflow that trained weights' outlier
activations may cause; run the project's teacher on real text for that.

1. precision: the teacher (MPNet-base shape + mean pooling + normalize) in float16 and bfloat16 vs float32 on
   the same random token batches of varied lengths: min and mean cosine; float32 twice as the sanity floor.
2. teacher throughput: texts/s at each length (full attention masks) for each dtype and batch size, best kept.
3. student training: samples/s of the MiniLM-L6-shaped student + mean pooling + Linear head, bf16 autocast,
   AdamW, squared-L2 loss against random normalised teacher-sized targets, per length and batch size.
4. estimate: GPU-hours of the paper's recipe (teacher embeds its texts once, the student trains on
   texts x epochs samples at batch 32) from the measured rates, at the token counts stated in the JSON.

Each timing: a warm-up, then a fixed number of steps or a time cap (whichever ends first), with the device
synchronised around the timed part; peak GPU memory (torch.cuda.max_memory_allocated) per measurement.
`--tiny` uses tiny shapes and few steps, so the code paths run on a CPU in seconds (float32 timings, one torch
thread); without a GPU only `--tiny` runs. Writes JSON (--out) and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FIRST_TOKEN_ID = 5  # random ids start above the special tokens (MPNet's padding id 1 sets its positions)
PAPER = {"documents": 4.2e6, "queries": 1.8e6, "epochs": 30, "batch_size": 32, "max_length": 512,
         "source": "LEAF (arXiv 2509.12539): ~6M texts, 30 epochs, batch 32, max length 512"}
ASSUMED_TOKENS = {"document": 256, "query": 16}
GPU_COUNTS = (1, 8)


@dataclass(frozen=True)
class Setup:
    teacher: dict  # MPNetConfig overrides
    student: dict  # BertConfig overrides
    lengths: tuple[int, ...]
    teacher_batches: tuple[int, ...]
    student_batches: tuple[int, ...]
    precision_batches: int  # batches of `teacher_batches[0]` texts at the longest length, lengths varied
    warmup: int
    steps: int
    cap_s: float  # per timing


FULL = Setup(teacher={"max_position_embeddings": 514},  # MPNetConfig defaults otherwise; 514 as mpnet-base has
             student={"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                      "intermediate_size": 1536, "max_position_embeddings": 512},
             lengths=(128, 512), teacher_batches=(64, 256), student_batches=(32, 256), precision_batches=8,
             warmup=3, steps=50, cap_s=6.0)
TINY = Setup(teacher={"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 128, "max_position_embeddings": 66},
             student={"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "intermediate_size": 64, "max_position_embeddings": 64},
             lengths=(16, 32), teacher_batches=(8, 32), student_batches=(32, 256), precision_batches=2,
             warmup=1, steps=3, cap_s=2.0)


# -- models ------------------------------------------------------------------------------------------------

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class Teacher(nn.Module):
    """MPNet encoder + mean pooling (in float32) + normalize, like the sentence-transformers teacher."""

    def __init__(self, config: MPNetConfig):
        super().__init__()
        self.encoder = MPNetModel(config, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(mean_pool(hidden.float(), mask), dim=-1)


class Student(nn.Module):
    """BERT encoder + mean pooling + Linear head to the teacher's dimension, like the LEAF student."""

    def __init__(self, config: BertConfig, out_dim: int):
        super().__init__()
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, out_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(mean_pool(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask))


def token_batch(vocab: int, pad_id: int, size: int, length: int, device: torch.device, generator: torch.Generator,
                varied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and attention mask: all `length` tokens, or (`varied`) 1..length tokens then padding."""
    ids = torch.randint(FIRST_TOKEN_ID, vocab, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    if varied:
        kept = torch.randint(1, length + 1, (size, 1), generator=generator)
        mask = (torch.arange(length) < kept).long()
        ids = ids.masked_fill(mask == 0, pad_id)
    return ids.to(device), mask.to(device)


# -- timing and memory -------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_steps(step, device: torch.device, setup: Setup) -> tuple[int, float]:
    """(steps, seconds): `setup.warmup` untimed calls of `step`, then up to `setup.steps` timed ones, stopping
    early once `setup.cap_s` has passed."""
    for _ in range(setup.warmup):
        step()
    synchronize(device)
    start, done = time.perf_counter(), 0
    while done < setup.steps and (done == 0 or time.perf_counter() - start < setup.cap_s):
        step()
        done += 1
    synchronize(device)
    return done, time.perf_counter() - start


# -- the three measurements --------------------------------------------------------------------------------

def precision_check(base: Teacher, setup: Setup, device: torch.device, generator: torch.Generator) -> dict:
    """Cosine between each dtype's vectors and float32's on the same batches ("float32" = a second fp32 pass)."""
    config = base.encoder.config
    batches = [token_batch(config.vocab_size, config.pad_token_id, setup.teacher_batches[0], max(setup.lengths),
                           device, generator, varied=True) for _ in range(setup.precision_batches)]
    out = {"texts": setup.teacher_batches[0] * setup.precision_batches, "max_length": max(setup.lengths),
           "lengths": "uniform 1..max_length, padded", "cast": "weights and activations in the dtype, pooling in "
           "float32; float32 = a second float32 pass"}
    reset_peak(device)
    reference = copy.deepcopy(base).to(device).eval()
    with torch.inference_mode():
        expected = torch.cat([reference(*batch) for batch in batches])
        for name in DTYPES:
            model = reference if name == "float32" else copy.deepcopy(reference).to(DTYPES[name])
            cosine = (torch.cat([model(*batch) for batch in batches]) * expected).sum(-1)
            out[name] = {"min_cosine": cosine.min().item(), "mean_cosine": cosine.mean().item()}
    out["peak_memory_bytes"] = peak_bytes(device)
    return out


def teacher_throughput(base: Teacher, setup: Setup, device: torch.device, dtypes: tuple[str, ...],
                       generator: torch.Generator) -> dict:
    config, rows = base.encoder.config, []
    for name in dtypes:
        model = copy.deepcopy(base).to(device=device, dtype=DTYPES[name]).eval()
        for length in setup.lengths:
            for size in setup.teacher_batches:
                reset_peak(device)
                ids, mask = token_batch(config.vocab_size, config.pad_token_id, size, length, device, generator)
                with torch.inference_mode():
                    steps, seconds = time_steps(lambda: model(ids, mask), device, setup)
                rows.append({"dtype": name, "length": length, "batch_size": size, "steps": steps,
                             "seconds": seconds, "texts_per_s": size * steps / seconds,
                             "tokens_per_s": size * length * steps / seconds, "peak_memory_bytes": peak_bytes(device)})
        model = None  # free this dtype's weights before the next one is made
    best = {str(length): max((r for r in rows if r["length"] == length), key=lambda r: r["texts_per_s"])
            for length in setup.lengths}
    return {"rows": rows, "best": best, "attention": config._attn_implementation}


def train_step(model: Student, optimizer, ids, mask, targets, autocast: torch.dtype | None) -> torch.Tensor:
    """One LEAF step: squared L2 between the normalised student vectors and the (normalised) targets."""
    with torch.autocast(ids.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        predicted = model(ids, mask)
    loss = (F.normalize(predicted.float(), dim=-1) - targets).pow(2).sum(-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def student_training(config: BertConfig, out_dim: int, setup: Setup, device: torch.device,
                     autocast: torch.dtype | None, generator: torch.Generator) -> dict:
    rows = []
    for length in setup.lengths:
        for size in setup.student_batches:
            reset_peak(device)
            torch.manual_seed(0)
            model = Student(config, out_dim).to(device).train()
            parameters = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
            ids, mask = token_batch(config.vocab_size, config.pad_token_id, size, length, device, generator)
            targets = F.normalize(torch.randn(size, out_dim, generator=generator), dim=-1).to(device)
            losses = []
            steps, seconds = time_steps(lambda: losses.append(train_step(model, optimizer, ids, mask, targets,
                                                                         autocast)), device, setup)
            rows.append({"length": length, "batch_size": size, "steps": steps, "seconds": seconds,
                         "samples_per_s": size * steps / seconds, "tokens_per_s": size * length * steps / seconds,
                         "last_loss": losses[-1].item(), "peak_memory_bytes": peak_bytes(device)})
            model = optimizer = None  # free them before the next setting's are made
    return {"rows": rows, "autocast": str(autocast).removeprefix("torch.") if autocast else "off (float32)",
            "optimizer": "AdamW lr 1e-4, weight decay 0.01", "loss": "squared L2 of normalised vectors",
            "parameters": parameters,
            "attention": config._attn_implementation}


# -- the paper recipe's cost -------------------------------------------------------------------------------

def seconds_at(length: float, seconds_by_length: dict[int, float]) -> float:
    """Seconds per text at `length` tokens: linear through (0, 0) and the measured (length, seconds) points;
    past the longest, that length's seconds per token (only --tiny's short lengths get there)."""
    xs = np.array([0, *sorted(seconds_by_length)], dtype=float)
    ys = np.array([0.0, *(seconds_by_length[x] for x in sorted(seconds_by_length))])
    if length <= xs[-1]:
        return float(np.interp(length, xs, ys))
    return float(ys[-1] * length / xs[-1])


def estimate(teacher: dict, student: dict) -> dict:
    """GPU-hours of the paper's recipe at the measured rates (teacher: best per length; student: batch 32)."""
    teacher_s = {int(k): 1 / r["texts_per_s"] for k, r in teacher["best"].items()}
    student_s = {r["length"]: 1 / r["samples_per_s"] for r in student["rows"] if r["batch_size"] == PAPER["batch_size"]}
    per_text = {kind: seconds_at(ASSUMED_TOKENS[kind], teacher_s) for kind in ASSUMED_TOKENS}
    per_sample = {kind: seconds_at(ASSUMED_TOKENS[kind], student_s) for kind in ASSUMED_TOKENS}
    texts = PAPER["documents"] + PAPER["queries"]
    samples = texts * PAPER["epochs"]
    document_fraction = PAPER["documents"] / texts
    teacher_hours = (PAPER["documents"] * per_text["document"] + PAPER["queries"] * per_text["query"]) / 3600
    training_hours = samples * (document_fraction * per_sample["document"]
                                + (1 - document_fraction) * per_sample["query"]) / 3600
    return {
        "assumptions": {
            "paper": PAPER, "tokens": ASSUMED_TOKENS, "training_samples": samples,
            "training_document_fraction": document_fraction,
            "per_text_time": "linear in tokens through (0, 0) and the measured lengths, past the longest "
                             "its seconds per token (seconds_at); padding ignored, as with length-grouped "
                             "batches",
            "teacher_rate": "best dtype and batch size per measured length",
            "student_rate": f"batch {PAPER['batch_size']} per GPU, the measured autocast",
            "scaling": "linear in GPUs: data-parallel embedding and DDP with no communication or input cost",
        },
        "teacher_seconds_per_text": per_text, "student_seconds_per_sample": per_sample,
        "teacher_gpu_hours": teacher_hours, "training_gpu_hours": training_hours,
        "hours": {str(n): {"teacher": teacher_hours / n, "training": training_hours / n,
                           "total": (teacher_hours + training_hours) / n} for n in GPU_COUNTS},
    }


# -- the run -----------------------------------------------------------------------------------------------

def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info |= {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                 "memory_bytes": torch.cuda.get_device_properties(device).total_memory,
                 "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    else:
        info |= {"name": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    return info


def run(setup: Setup, device: torch.device) -> dict:
    started = time.time()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher_config = MPNetConfig(**setup.teacher)
    base = Teacher(teacher_config).eval()
    on_gpu = device.type == "cuda"
    report = {"device": device_info(device), "settings": asdict(setup) | {"teacher_config": {
        k: getattr(teacher_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size", "vocab_size")},
        "teacher_parameters": sum(p.numel() for p in base.parameters())}}
    report["precision"] = precision_check(base, setup, device, generator)
    report["teacher_throughput"] = teacher_throughput(base, setup, device, ("float16", "bfloat16") if on_gpu
                                                      else ("float32",), generator)
    del base
    report["student_training"] = student_training(BertConfig(**setup.student), teacher_config.hidden_size, setup,
                                                  device, torch.bfloat16 if on_gpu else None, generator)
    report["estimate"] = estimate(report["teacher_throughput"], report["student_training"])
    report["ray_imported"] = sys.modules.get("ray") is not None
    report["wall_s"] = time.time() - started
    return report


def print_summary(report: dict, out: Path) -> None:
    device, precision = report["device"], report["precision"]
    print(f"\n{device['name']} ({device['type']}), torch {device['torch']}")
    print("precision vs float32, min / mean cosine: " + ", ".join(
        f"{name} {precision[name]['min_cosine']:.6f} / {precision[name]['mean_cosine']:.6f}" for name in DTYPES))
    print(f"\n{'teacher':<10}{'dtype':>10}{'length':>8}{'batch':>7}{'texts/s':>11}{'peak MiB':>10}")
    for r in report["teacher_throughput"]["rows"]:
        print(f"{'':<10}{r['dtype']:>10}{r['length']:>8}{r['batch_size']:>7}{r['texts_per_s']:>11.1f}"
              f"{mib(r['peak_memory_bytes']):>10}")
    print(f"\n{'student':<10}{'length':>8}{'batch':>7}{'samples/s':>11}{'peak MiB':>10}{'loss':>9}")
    for r in report["student_training"]["rows"]:
        print(f"{'':<10}{r['length']:>8}{r['batch_size']:>7}{r['samples_per_s']:>11.1f}"
              f"{mib(r['peak_memory_bytes']):>10}{r['last_loss']:>9.4f}")
    est = report["estimate"]
    print(f"\npaper recipe at these rates: teacher {est['teacher_gpu_hours']:.2f} GPU-h, training "
          f"{est['training_gpu_hours']:.2f} GPU-h; on 8 GPUs {est['hours']['8']['total']:.2f} h (linear scaling)")
    print(f"(ray imported: {report['ray_imported']}; {report['wall_s']:.1f} s; saved {out})")


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json", help="where the JSON goes")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (runs on a CPU in seconds)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: the full check needs one (use --tiny to exercise the code on a CPU)")
    if device.type == "cpu":
        torch.set_num_threads(1)
    report = run(TINY if args.tiny else FULL, device) | {"mode": "tiny" if args.tiny else "full"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_summary(report, args.out)


if __name__ == "__main__":
    main()
