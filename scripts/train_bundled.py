"""Train prunekit's bundled shapes LLaVA from scratch, reproducibly, on CPU.

    python scripts/train_bundled.py --work runs/shapes --out prunekit/tools/assets/shapes-llava

Stages (no loss ever touches the language model's attention or says which tokens matter):

1. vision  — the CLIP ViT alone, on dense labels of each patch (colour, shape, object centre, quadrant) and of the
             [CLS] token (which colours / shapes are present, how many objects);
2. align   — the projector alone, mapping each patch feature near the sum of the word embeddings of its colour, shape
             and quadrant words (and a centre word); then the projector and the word embeddings are frozen;
3. language — the Llama decoder alone, on the answer word only (cross-entropy at the last position), on projected
             features of the frozen ViT, with a curriculum: few objects and most background patches left out of the
             sequence first (their original position ids kept), then more objects and all 144 patches.

The run checkpoints every minute and resumes from ``--work`` when restarted with the same arguments. It records the
seed, the data, each stage's time and the held-out accuracy per question type in ``training.json`` next to the model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.tools import bundled
from prunekit.tools.data import QUESTION_TYPES, ShapesVQA
from prunekit.tools.data.shapes import COLORS, SHAPES, make_question

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# (min objects, max objects, share of background patches kept in the sequence)
CURRICULUM = [(1, 2, 0.0), (1, 3, 0.1), (1, 5, 0.3), (2, 8, 0.6), (3, 8, 1.0)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> the processor's normalised float (B, 3, H, W)."""
    return (images.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


class Pool:
    """A fixed, seeded set of training scenes: images (uint8), per-patch labels and objects."""

    def __init__(self, size: int, seed: int) -> None:
        from tqdm import tqdm

        ds = ShapesVQA("train", size, seed=seed, min_objects=1, max_objects=8)
        self.objects, images, labels = [], [], {k: [] for k in ("color", "shape", "center", "quadrant")}
        for s in tqdm(ds, desc="scenes", mininterval=5, file=sys.stdout):
            self.objects.append(s.objects)
            images.append(torch.frombuffer(bytearray(s.image.tobytes()), dtype=torch.uint8))
            for k, v in bundled.patch_labels(s.objects).items():
                labels[k].append(v)
        self.images = torch.stack(images).view(size, bundled.IMAGE_SIZE, bundled.IMAGE_SIZE, 3)
        self.labels = {k: torch.stack(v) for k, v in labels.items()}
        self.n_objects = torch.tensor([len(o) for o in self.objects])
        self.features: torch.Tensor | None = None


class VisionHeads(nn.Module):
    """Training-only heads on the ViT's last hidden state (discarded after stage 1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.patch = nn.Linear(width, len(COLORS) + 1 + len(SHAPES) + 1 + 2 + 4)
        self.cls = nn.Linear(width, len(COLORS) + len(SHAPES) + 11)

    def loss(self, hidden: torch.Tensor, labels: dict, objects: list) -> tuple[torch.Tensor, dict]:
        nc, ns = len(COLORS) + 1, len(SHAPES) + 1
        p = self.patch(hidden[:, 1:])
        parts = torch.split(p, [nc, ns, 2, 4], dim=-1)
        losses, acc = [], {}
        obj = labels["color"] > 0
        for name, logits in zip(("color", "shape", "center", "quadrant"), parts):
            y = labels[name]
            if name == "shape":  # only object patches: background is already told apart by the colour head, and
                # most patches are background, which would drown the one label that needs context to learn
                losses.append(2 * F.cross_entropy(logits[obj][:, 1:], y[obj] - 1))
            else:
                losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
            hit = logits.argmax(-1) == y
            if name == "shape":
                hit = logits[..., 1:].argmax(-1) + 1 == y
            if name in ("color", "shape"):  # accuracy on object patches, where it is hard
                hit = hit[y > 0]
            acc[name] = hit.float().mean().item()
        c = self.cls(hidden[:, 0])
        present = torch.zeros(len(objects), len(COLORS) + len(SHAPES))
        for b, objs in enumerate(objects):
            for o in objs:
                present[b, list(COLORS).index(o.color)] = 1
                present[b, len(COLORS) + SHAPES.index(o.shape)] = 1
        count = torch.tensor([len(o) for o in objects])
        losses.append(F.binary_cross_entropy_with_logits(c[:, :-11], present))
        losses.append(F.cross_entropy(c[:, -11:], count))
        acc["cls_present"] = ((c[:, :-11] > 0).float() == present).float().mean().item()
        return sum(losses), acc


def vision_hidden(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def project(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Exactly what LLaVA inserts at the image tokens ('default' strategy: [CLS] dropped)."""
    return model.model.multi_modal_projector(vision_hidden(model, pixel_values)[:, 1:])


class Trainer:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        config = bundled.build_config(text_layers=args.text_layers, text_width=args.text_width,
                                      text_heads=args.text_heads)
        from transformers import LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
        self.heads = VisionHeads(config.vision_config.hidden_size)
        self.tokenizer = bundled.build_tokenizer()
        self.state = {"stage": "vision", "step": 0, "level": 0, "record": {}, "elapsed": {}}
        self.opt = None
        ckpt = self.work / "checkpoint.pt"
        if ckpt.exists():
            saved = torch.load(ckpt, weights_only=False)
            self.model.load_state_dict(saved["model"])
            self.heads.load_state_dict(saved["heads"])
            self.state = saved["state"]
            self._opt_state = saved.get("opt")
            torch.set_rng_state(saved["torch_rng"])
            random.setstate(saved["py_rng"])
            log(f"resumed at stage {self.state['stage']} step {self.state['step']}")
            if args.restart_stage == "language" and self.state["stage"] in ("language", "done"):
                torch.manual_seed(args.seed)  # the same initialisation as a run that never had a language stage
                fresh = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
                lm_state = {k: v for k, v in fresh.state_dict().items() if ".language_model." in k and "embed_tokens" not in k}
                self.model.load_state_dict(lm_state, strict=False)
                aborted = {k: self.state.pop(k) for k in ("level", "level_steps", "levels", "final_start") if k in self.state}
                self.state.setdefault("restarts", []).append(
                    {"stage": "language", "after_steps": self.state["step"], "seconds": self.state["elapsed"].pop("language", 0.0), **aborted})
                self.state.update(stage="language", step=0, level=0)
                self._opt_state = None
                log("language stage restarted from its initialisation")
        else:
            self._opt_state = None
        log(f"building the training pool: {args.pool} scenes (seed {args.seed})")
        self.pool = Pool(args.pool, args.seed)
        self.last_save = time.time()

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def save(self, force: bool = False) -> None:
        if not force and time.time() - self.last_save < 60:
            return
        tmp = self.work / "checkpoint.pt.tmp"
        torch.save({"model": self.model.state_dict(), "heads": self.heads.state_dict(), "state": self.state,
                    "opt": self.opt.state_dict() if self.opt else None, "torch_rng": torch.get_rng_state(),
                    "py_rng": random.getstate()}, tmp)
        tmp.replace(self.work / "checkpoint.pt")
        self.last_save = time.time()

    def tick(self, stage: str, seconds: float) -> None:
        self.state["elapsed"][stage] = self.state["elapsed"].get(stage, 0.0) + seconds

    def optimizer(self, params, lr: float):
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        if self._opt_state is not None:
            self.opt.load_state_dict(self._opt_state)
            self._opt_state = None
        return self.opt

    def train_only(self, params) -> list:
        """Freeze the whole model except ``params`` (each stage trains one part)."""
        params = list(params)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        return params

    def next_stage(self, stage: str) -> None:
        self.state.update(stage=stage, step=0)
        self.opt, self._opt_state = None, None
        self.save(force=True)

    # -- stages --------------------------------------------------------------------------------------------------
    def train_vision(self) -> None:
        a, m = self.args, self.model
        vt = m.model.vision_tower
        opt = self.optimizer(self.train_only(vt.parameters()) + list(self.heads.parameters()), a.vision_lr)
        ema = {}
        vt.train()
        while self.state["step"] < a.vision_steps:
            t0 = time.time()
            idx = torch.randint(len(self.pool.objects), (a.batch,))
            labels = {k: v[idx] for k, v in self.pool.labels.items()}
            hidden = vision_hidden(m, pixels(self.pool.images[idx]))
            loss, acc = self.heads.loss(hidden, labels, [self.pool.objects[i] for i in idx])
            lr = a.vision_lr * min(1.0, (self.state["step"] + 1) / 100) * 0.5 * (1 + math.cos(math.pi * self.state["step"] / a.vision_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in acc.items():
                ema[k] = 0.98 * ema.get(k, v) + 0.02 * v
            self.state["step"] += 1
            self.tick("vision", time.time() - t0)
            if self.state["step"] % 50 == 0:
                log(f"vision {self.state['step']}/{a.vision_steps} loss {loss.item():.3f} "
                    + " ".join(f"{k} {v:.3f}" for k, v in ema.items()))
            self.save()
        vt.eval()
        self.state["record"]["vision"] = {k: round(v, 4) for k, v in ema.items()}
        self.next_stage("align")

    def cache_features(self) -> None:
        feats = []
        with torch.no_grad():
            for i in range(0, len(self.pool.objects), 64):
                feats.append(project(self.model, pixels(self.pool.images[i:i + 64])).half())
        self.pool.features = torch.cat(feats)

    def train_align(self) -> None:
        a, m = self.args, self.model
        proj = m.model.multi_modal_projector
        opt = self.optimizer(self.train_only(proj.parameters()), a.align_lr)
        emb = m.get_input_embeddings().weight.detach()
        while self.state["step"] < a.align_steps:
            t0 = time.time()
            idx = torch.randint(len(self.pool.objects), (a.batch,))
            with torch.no_grad():
                hidden = vision_hidden(m, pixels(self.pool.images[idx]))[:, 1:]
            target = bundled.patch_targets({k: v[idx] for k, v in self.pool.labels.items()}, emb)
            loss = F.mse_loss(proj(hidden), target) / target.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.state["step"] += 1
            self.tick("align", time.time() - t0)
            if self.state["step"] % 50 == 0:
                log(f"align {self.state['step']}/{a.align_steps} relative mse {loss.item():.4f}")
            self.save()
        self.state["record"]["align_relative_mse"] = round(loss.item(), 5)
        self.next_stage("language")

    def batch_text(self, idx: torch.Tensor, keep_bg: float, rng: random.Random, turns: int):
        """Sequences [<s>, kept patches, q1, a1, q2, a2, ..., q_n] left-padded, with original position ids; the
        answer of every turn is a target (the last one at the final position, as at inference). Several questions
        per image is how LLaVA's own conversation data look, and it gives each image forward several answers."""
        emb = self.model.get_input_embeddings()
        g = bundled.GRID ** 2
        rows, answers, types = [], [], []
        for i in idx.tolist():
            objs = self.pool.objects[i]
            asked: set[str] = set()
            text: list[int] = []
            targets: list[int] = []
            for t in range(turns):
                for _ in range(50):
                    kind = rng.choice(QUESTION_TYPES)
                    qa = make_question(objs, kind, rng)
                    if qa is not None and qa[0] not in asked:
                        break
                else:
                    break
                asked.add(qa[0])
                if text:
                    text.append(answers[-1])  # the previous turn's answer, teacher-forced
                text += self.tokenizer(qa[0], add_special_tokens=False).input_ids
                targets.append(len(text) - 1)
                answers.append(self.tokenizer.convert_tokens_to_ids(qa[1]))
                types.append(kind)
            obj_patch = (self.pool.labels["color"][i] > 0) | (self.pool.labels["center"][i] > 0)
            keep = obj_patch | (torch.rand(g) < keep_bg)
            rows.append((i, keep.nonzero().squeeze(1), torch.tensor(text), targets))
        L = max(1 + len(k) + len(q) for _, k, q, _ in rows)
        d = emb.weight.shape[1]
        x = torch.zeros(len(rows), L, d)
        pos = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        where = []
        bos = emb.weight[self.tokenizer.bos_token_id]
        for b, (i, keep, q, targets) in enumerate(rows):
            n = 1 + len(keep) + len(q)
            s = L - n
            x[b, s] = bos
            x[b, s + 1:s + 1 + len(keep)] = self.pool.features[i, keep].float()
            x[b, s + 1 + len(keep):] = emb.weight[q]
            pos[b, s:] = torch.cat([torch.tensor([0]), keep + 1, g + 1 + torch.arange(len(q))])
            mask[b, s:] = 1
            where += [(b, s + 1 + len(keep) + t) for t in targets]
        return x, pos, mask, torch.tensor(answers), types, torch.tensor(where)

    def train_language(self) -> None:
        a, m = self.args, self.model
        if self.pool.features is None:
            log("caching projected features of the pool")
            self.cache_features()
        lm = m.model.language_model
        params = self.train_only(p for n, p in lm.named_parameters() if "embed_tokens" not in n)
        if self.state["step"] == 0:  # the stage's own seed: a restarted stage replays a clean run exactly
            torch.manual_seed(a.seed * 1000 + 3)
        opt = self.optimizer(params, a.text_lr)
        rng = random.Random(a.seed * 1000 + self.state["step"])
        ema: dict[str, float] = {}
        lm.train()
        while self.state["step"] < a.text_steps:
            t0 = time.time()
            lo, hi, keep_bg = CURRICULUM[self.state["level"]]
            allowed = ((self.pool.n_objects >= lo) & (self.pool.n_objects <= hi)).nonzero().squeeze(1)
            idx = allowed[torch.randint(len(allowed), (a.batch,))]
            x, pos, mask, y, types, where = self.batch_text(idx, keep_bg, rng, a.turns)
            h = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state[where[:, 0], where[:, 1]]
            logits = m.lm_head(h)
            loss = F.cross_entropy(logits, y)
            step = self.state["step"]
            lr = a.text_lr * min(1.0, (step + 1) / 200)
            if self.state["level"] == len(CURRICULUM) - 1:  # cosine decay over the final level only
                start = self.state.setdefault("final_start", step)
                lr *= 0.5 * (1 + math.cos(math.pi * (step - start) / max(1, a.text_steps - start)))
            for gr in opt.param_groups:
                gr["lr"] = lr
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            hit = (logits.argmax(-1) == y).float()
            for t, v in zip(types, hit.tolist()):
                ema[t] = 0.99 * ema.get(t, v) + 0.01 * v
            self.state["step"] += 1
            self.tick("language", time.time() - t0)
            level_steps = self.state.setdefault("level_steps", 0) + 1
            self.state["level_steps"] = level_steps
            lookup = min(ema.get(t, 0) for t in ("color", "shape", "spatial"))
            if (self.state["level"] < len(CURRICULUM) - 1 and level_steps >= 200
                    and (lookup >= a.level_up or level_steps >= a.max_level_steps)):
                self.state["level"] += 1
                self.state["level_steps"] = 0
                self.state.setdefault("levels", []).append({"step": step, "lookup_ema": round(lookup, 3)})
                log(f"curriculum level {self.state['level']}: {CURRICULUM[self.state['level']]}")
            if step % 50 == 0:
                log(f"language {step}/{a.text_steps} L{self.state['level']} loss {loss.item():.3f} "
                    + " ".join(f"{k} {ema[k]:.2f}" for k in QUESTION_TYPES if k in ema))
            if a.eval_every and step and step % a.eval_every == 0:
                lm.eval()
                log(f"held-out (val, 600): {evaluate(m, self.tokenizer, 600, 'val')}")
                lm.train()
            self.save()
        lm.eval()
        self.next_stage("done")

    def run(self, stop_after: str | None = None) -> dict | None:
        stages = {"vision": self.train_vision, "align": self.train_align, "language": self.train_language}
        while self.state["stage"] != "done":
            stage = self.state["stage"]
            stages[stage]()
            if stage == stop_after:
                log(f"stopped after stage {stage}; rerun with the same --work to resume")
                return None
        return self.state


def evaluate(model, tokenizer, size: int, split: str, seed: int = 0) -> dict:
    """Accuracy per question type, through the processor and ``generate`` exactly as ``prunekit eval`` answers."""
    from prunekit.tools.evaluation import evaluate as run_eval

    base = run_eval(model.eval(), bundled.build_processor(tokenizer), list(ShapesVQA(split, size, seed=seed)), [],
                    progress=False)[0]
    return {**{t: round(v, 4) for t, v in base.per_type.items()}, "all": round(base.accuracy, 4)}


def nest_vision_keys(path: Path) -> None:
    """Store the CLIP tower's weights under ``vision_tower.vision_model.*`` (the layout of the original LLaVA
    checkpoints), as vLLM's LLaVA loads them; transformers maps them back to its own names on load. Only the keys
    change: every tensor's bytes stay as they are."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    head, nested = "vision_tower.", "vision_tower.vision_model."
    renamed = {(nested + k[len(head):] if k.startswith(head) and not k.startswith(nested) else k): v
               for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/shapes-llava", help="checkpoints and logs; a rerun resumes from here")
    ap.add_argument("--out", default=str(bundled.MODEL_DIR), help="where the trained model is saved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=30000, help="training scenes (train split, 1-8 objects)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vision-steps", type=int, default=2000)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--align-steps", type=int, default=300)
    ap.add_argument("--align-lr", type=float, default=2e-3)
    ap.add_argument("--text-steps", type=int, default=4400)
    ap.add_argument("--text-lr", type=float, default=1e-3)
    ap.add_argument("--text-layers", type=int, default=8)
    ap.add_argument("--text-width", type=int, default=192)
    ap.add_argument("--text-heads", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4, help="questions (with answers) per image in a training sequence")
    ap.add_argument("--restart-stage", choices=["language"], default=None,
                    help="start this stage again from its seeded initialisation, keeping the earlier stages")
    ap.add_argument("--level-up", type=float, default=0.9, help="lookup accuracy (EMA) that opens the next level")
    ap.add_argument("--max-level-steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--test-size", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-after", choices=["vision", "align", "language"], default=None,
                    help="checkpoint and exit after this stage; a rerun with the same --work resumes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    state = trainer.run(args.stop_after)
    if state is None:
        return 0
    model, tok = trainer.model, trainer.tokenizer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)  # float16 on disk (a few MB); load() casts to float32
    nest_vision_keys(out / "model.safetensors")
    bundled.build_processor(tok).save_pretrained(out)
    model.float()
    from prunekit.tools.bundled import load

    loaded, _ = load(out)
    log("final held-out evaluation (test split) of the saved model")
    test = evaluate(loaded, tok, args.test_size, "test")
    record = {
        "seed": args.seed, "arguments": vars(args),
        "data": {"train": f"ShapesVQA('train', seed={args.seed}, min_objects=1, max_objects=8), first {args.pool} "
                          f"scenes, a fresh random question per use", "test": f"ShapesVQA('test', {args.test_size}, seed=0)"},
        "curriculum": CURRICULUM, "levels": state.get("levels", []), "restarts": state.get("restarts", []),
        "train_seconds": {k: round(v, 1) for k, v in state["elapsed"].items()},
        "train_minutes_total": round(sum(state["elapsed"].values()) / 60, 1),
        "stage_records": state["record"],
        "test_accuracy": test,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"test accuracy {test}; saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
