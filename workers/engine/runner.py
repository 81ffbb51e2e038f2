"""The evaluation runner: a cascade of attacks over the examples still robust.

Per example the state is one flag, "still robust"; each stage attacks only those, and an
example is broken as soon as any attack (any restart, any iterate) finds a misclassified
point inside the ball and the box. A claimed break counts only after it is re-checked in fp32
(no autocast), inside the ball and the box, and finite: bf16 rounding must never make a model
look weaker than it is. This is AutoAttack's worst-case-per-example definition.

The flags are saved after every stage (``npz``, no pickles) in ``state_dir``; a re-run with
the same state directory, data, threat and seed skips the stages already done, so a worker
killed mid-evaluation resumes instead of restarting.

Each stage attacks the examples still robust *block by block*: a block is ``batch_size``
consecutive examples of the whole evaluation set (``ctx.offset`` is where the examples given
here start in it), attacked as one batch with a generator seeded by the stage and the block.
So an example's outcome depends on its block only, never on which other blocks one process
ran: a slice of the set that starts on a block boundary (a shard) gives every example the
outcome it gets in the whole run, and the slices' saved states concatenate into the whole
run's (:func:`merge_states`).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from workers.engine.attacks.apgd import APGD, APGDTargeted
from workers.engine.attacks.base import Attack, AttackOutput, Forward, Loss, Ranking, margin
from workers.engine.attacks.square import Square
from workers.engine.threats import Norm, Threat, threat_for
from workers.engine.types import RunContext

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class Stage:
    """One attack of a cascade; ``name`` is unique within the cascade (it keys the state)."""

    name: str
    attack: Attack
    white_box: bool = True
    # Only the examples still robust whose smallest margin found so far (z_y - max_j z_j,
    # fp32, at any earlier stage's output) is at most this fraction of their clean margin.
    escalate: float | None = None


def autoattack_stages(norm: Norm, num_classes: int, steps: int = 100, n_targets: int = 9,
                      square_queries: int = 5000) -> list[Stage]:
    """AutoAttack "standard" (Croce & Hein 2020, as RobustBench pins it).

    l_inf / l_2: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries).
    l_1: l1-APGD-CE with 5 restarts and APGD-T, both with the 3eps/2eps/eps schedule
    (FAB-T and Square have no l_1 version in AutoAttack).
    """
    from workers.engine.attacks.fab import FABTargeted

    k = min(n_targets, num_classes - 1)
    if norm is Norm.L1:
        return [
            Stage("apgd-ce", APGD(norm, steps, restarts=5, loss=Loss.CE, large_eps=True)),
            Stage("apgd-t", APGDTargeted(norm, steps, n_targets=k, large_eps=True)),
        ]
    return [
        Stage("apgd-ce", APGD(norm, steps, loss=Loss.CE)),
        Stage("apgd-t", APGDTargeted(norm, steps, n_targets=k)),
        Stage("fab-t", FABTargeted(norm, steps, n_targets=k)),
        Stage("square", Square(norm, square_queries), white_box=False),
    ]


def fast_stages(norm: Norm, num_classes: int, steps: int = 100, n_targets: int = 9) -> list[Stage]:
    """APGD-CE then APGD-T: most of AutoAttack's strength at a fraction of its cost."""
    k = min(n_targets, num_classes - 1)
    large = norm is Norm.L1
    return [
        Stage("apgd-ce", APGD(norm, steps, loss=Loss.CE, large_eps=large)),
        Stage("apgd-t", APGDTargeted(norm, steps, n_targets=k, large_eps=large)),
    ]


ESCALATE = 0.15
"""``efficient``: an example still robust after the first two stages whose smallest margin
found is at most this fraction of its clean margin is near the boundary and escalates. On the
tuning models every example an escalation stage broke had come within 0.061 of its clean
margin (``benchmarks/attacks.py``); 0.15 keeps more than twice that."""


def efficient_stages(norm: Norm, num_classes: int, steps: int = 100, n_targets: int = 2,
                     discard: float = 4.0, escalate: float = ESCALATE,
                     more_targets: int = 7, square_queries: int = 1000) -> list[Stage]:
    """AutoAttack's protocol with its effort spent where it can still change the result.

    APGD-CE, then targeted APGD on the ``n_targets`` classes ranked best-first by the
    gradient-normalised margin (MALT, Melamed et al. 2024) instead of by logit; in both, from
    the second step-size checkpoint on, an example whose smallest margin would stay positive
    even at ``discard`` times its pace since the previous checkpoint over every remaining
    step has converged and leaves the batch (:func:`workers.engine.attacks.apgd.hopeless`:
    A^3's discarding of hopeless points, Liu et al. 2022, and the stop of an iterate that only
    cycles, Doldo et al. 2025, in one rule).

    Then the examples still robust whose smallest margin came within ``escalate`` of their
    clean margin (near the boundary: where a run's luck or a further target decides) escalate
    to what AutoAttack would still try, each only on those still robust and near: the same
    ``n_targets`` targets again from a new random start, the next ``more_targets`` classes of
    the ranking, a second APGD-CE, and Square (``square_queries``, with the same discarding
    of hopeless examples). The escalated targeted stages run every target of an example at
    once (one row per example and target): their batches are small, so one loop of steps
    instead of one per target is most of their wall time. Examples far from the boundary
    skip them.
    """
    k = min(n_targets, num_classes - 1)
    rest = max(min(more_targets, num_classes - 1 - k), 0)
    large = norm is Norm.L1
    stages = [
        Stage("apgd-ce", APGD(norm, steps, loss=Loss.CE, large_eps=large, discard=discard)),
        Stage("apgd-t", APGDTargeted(norm, steps, n_targets=k, large_eps=large,
                                     discard=discard, ranking=Ranking.NORMALISED_MARGIN)),
        Stage("apgd-t-again", APGDTargeted(norm, steps, n_targets=k, large_eps=large,
                                           discard=discard, ranking=Ranking.NORMALISED_MARGIN,
                                           parallel=True), escalate=escalate),
    ]
    if rest:
        stages.append(Stage("apgd-t-more", APGDTargeted(
            norm, steps, n_targets=rest, large_eps=large, discard=discard,
            ranking=Ranking.NORMALISED_MARGIN, skip_targets=k, parallel=True),
            escalate=escalate))
    stages.append(Stage("apgd-ce-again", APGD(norm, steps, loss=Loss.CE, large_eps=large,
                                              discard=discard), escalate=escalate))
    if norm is not Norm.L1 and square_queries > 0:
        stages.append(Stage("square", Square(norm, square_queries, discard=discard),
                            white_box=False, escalate=escalate))
    return stages


@dataclass(frozen=True)
class StageCost:
    """What one stage spent: example-forwards and example-backwards (input gradients) of the
    model, fp32 re-checks included, and wall seconds."""

    name: str
    forwards: int
    backwards: int
    seconds: float


@dataclass
class CascadeResult:
    clean_correct: Tensor  # bool [N]
    robust: Tensor  # bool [N]
    broken_by: Tensor  # int16 [N]: stage index that broke it, -1 clean error, -2 robust
    stage_robust: list[tuple[str, float]] = field(default_factory=list)
    rejected: int = 0  # claimed breaks that failed the fp32 re-check
    resumed: list[str] = field(default_factory=list)  # stages loaded from state_dir
    cost: list[StageCost] = field(default_factory=list)  # per stage run in this process
    # Per example, the smallest fp32 margin found at an output (cascades that escalate).
    closest: Tensor | None = None

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if self.robust.numel() else 0.0

    def save_flags(self, path: Path) -> Path:
        _save(path, robust=self.robust.numpy(), clean_correct=self.clean_correct.numpy(),
              broken_by=self.broken_by.numpy())
        return path


@dataclass
class CleanPass:
    correct: Tensor  # bool [N], CPU
    logits: Tensor  # float32 [N, K], CPU


def clean_pass(model: nn.Module, x: Tensor, y: Tensor, ctx: RunContext,
               state_dir: Path | None = None) -> CleanPass:
    """fp32 logits of the clean inputs, computed once and shared by every stage and eps."""
    path = None if state_dir is None else state_dir / "clean.npz"
    key = _fingerprint("clean", y)
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) == key:
                return CleanPass(torch.from_numpy(f["correct"]), torch.from_numpy(f["logits"]))
    fwd = Forward(model)
    out: list[Tensor] = []
    bs, s = max(ctx.batch_size, 1), 0
    with torch.inference_mode():
        while s < x.shape[0]:
            try:
                out.append(fwd.fp32(x[s:s + bs].to(ctx.device)).cpu())
            except torch.cuda.OutOfMemoryError as err:
                bs = _halve(bs, err)
                continue
            s += out[-1].shape[0]
    logits = torch.cat(out) if out else torch.empty(0, 0)
    res = CleanPass(logits.argmax(1) == y if out else torch.zeros(0, dtype=torch.bool), logits)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, key=np.array(key), correct=res.correct.numpy(), logits=logits.numpy())
    return res


def run_cascade(model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: float,
                stages: list[Stage], ctx: RunContext, *, clean: CleanPass | None = None,
                state_dir: Path | None = None, progress: ProgressFn | None = None,
                fwd: Forward | None = None) -> CascadeResult:
    """Run ``stages`` in order on the examples still robust; see the module docstring."""
    report = progress or ctx.progress
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
    if clean is None:
        clean = clean_pass(model, x, y, ctx, state_dir)
    # channels_last speeds up the search on CPUs too (1.5x for a small CNN's forward+backward);
    # bf16 where ctx.amp says; BatchNorm folded into the convolutions. Breaks are confirmed on
    # the model itself in fp32.
    fwd = fwd or Forward(model, amp=ctx.amp, channels_last=True, optimise=True)
    threat = threat_for(norm)
    n = x.shape[0]
    robust = clean.correct.clone()
    broken_by = torch.where(robust, -2, -1).to(torch.int16)
    x_adv = x.clone()
    fresh = torch.zeros(n, dtype=torch.bool)  # broken in this process (x_adv is in memory)
    result = CascadeResult(clean.correct, robust, broken_by)
    clean_margin = margin(clean.logits, y) if n else torch.zeros(0)
    closest = clean_margin.clone()  # the smallest margin found so far, per example
    track = any(s.escalate is not None for s in stages)
    names = "+".join(s.name for s in stages)
    for i, stage in enumerate(stages):
        key = _fingerprint(f"{norm.value}|{eps!r}|{names}|{i}|{ctx.seed}", y)
        path = None if state_dir is None else state_dir / f"stage{i:02d}-{stage.name}.npz"
        loaded = _load_stage(path, key)
        if loaded is not None:
            robust.copy_(loaded[0])
            broken_by.copy_(loaded[1])
            if loaded[2] is not None:
                closest.copy_(loaded[2])
            result.stage_robust.append((stage.name, float(robust.float().mean())))
            result.resumed.append(stage.name)
            if loaded[3] is not None:  # what it cost where it ran (summed over shards)
                fw, bw, sec = (float(v) for v in loaded[3])
                result.cost.append(StageCost(stage.name, int(fw), int(bw), sec))
            continue
        todo = robust.nonzero().squeeze(1)
        if stage.escalate is not None:
            near = closest[todo] <= stage.escalate * clean_margin[todo]
            todo = todo[near]
        f0, b0, t0 = fwd.examples, fwd.gradients, time.perf_counter()
        seed_key = key.rsplit("|n=", 1)[0]  # the stage, not the examples
        block = max(ctx.batch_size, 1)
        blocks = (todo + ctx.offset) // block
        done = 0
        bs = block
        gen, gen_block = torch.Generator(), -1
        while done < todo.numel():
            here = int(blocks[done])
            if here != gen_block:  # a block's own draws and checks, wherever it is run
                gen = ctx.generator(salt=zlib.crc32(f"{seed_key}|block={here}".encode()))
                gen_block, bs = here, block
                fwd.new_block()
            end = done + int((blocks[done:done + bs] == here).sum())
            idx = todo[done:end]
            xb, yb = x[idx].to(ctx.device), y[idx].to(ctx.device)
            try:
                out = stage.attack.run(fwd, xb, yb, eps, gen, clean.logits[idx].to(ctx.device))
            except torch.cuda.OutOfMemoryError as err:
                bs = _halve(bs, err)
                continue
            broke, rejected = confirm(fwd, threat, xb, yb, eps, out)
            result.rejected += rejected
            hit = idx[broke.cpu()]
            robust[hit] = False
            broken_by[hit] = i
            x_adv[hit] = out.x_adv[broke].detach().float().cpu()
            fresh[hit] = True
            if track and bool((~broke).any()):
                with torch.inference_mode():
                    z = fwd.fp32(out.x_adv[~broke].float())
                kept = idx[(~broke).cpu()]
                closest[kept] = torch.minimum(closest[kept], margin(z, yb[~broke]).cpu())
            done += idx.numel()
            frac = (i + done / max(todo.numel(), 1)) / len(stages)
            report(frac, f"{stage.name} {norm.value} eps={eps:g}: "
                         f"robust {int(robust.sum())}/{n}")
        if todo.numel() == 0:
            report((i + 1) / len(stages), f"{stage.name}: nothing left to attack")
        result.cost.append(StageCost(stage.name, fwd.examples - f0, fwd.gradients - b0,
                                     time.perf_counter() - t0))
        if path is not None:
            c = result.cost[-1]
            _save(path, key=np.array(key), robust=robust.numpy(), broken_by=broken_by.numpy(),
                  closest=closest.numpy(),
                  cost=np.array([c.forwards, c.backwards, c.seconds], dtype=np.float64))
        result.stage_robust.append((stage.name, float(robust.float().mean())))
    assert_valid(threat, x[fresh], x_adv[fresh], eps)
    if track:
        result.closest = closest
    return result


AUDIT_TOLERANCE = 0.01
"""The overestimate of robust accuracy the audit bounds: 1 point."""
AUDIT_CONFIDENCE = 0.95
"""The confidence with which a passing audit bounds it."""


def audit_plan(n_total: int, n_robust: int, tolerance: float = AUDIT_TOLERANCE,
               confidence: float = AUDIT_CONFIDENCE) -> int:
    """How many of the ``n_robust`` examples the audited cascade left robust (out of
    ``n_total`` evaluated) the audit must find unbroken, drawn at random without replacement,
    to conclude with ``confidence`` that robust accuracy is overestimated by at most
    ``tolerance``.

    The overestimate is m / n_total, m being the robust examples the reference would break.
    It exceeds ``tolerance`` only if m >= m0 = floor(tolerance * n_total) + 1; the chance
    that n draws without replacement find none of m0 such examples is the hypergeometric
    C(r - m0, n) / C(r, n), and it only shrinks as m grows. The plan is the smallest n where
    it is at most 1 - ``confidence``: 0 when m0 > r (even breaking every robust example
    could not exceed the tolerance); never more than r - m0 + 1 (then the chance is 0).
    """
    r = n_robust
    m0 = math.floor(tolerance * n_total + 1e-9) + 1
    if m0 > r:
        return 0
    alpha = 1.0 - confidence
    p = 1.0  # C(r - m0, n) / C(r, n), built one draw at a time
    for n in range(1, r + 1):
        p *= (r - m0 - (n - 1)) / (r - (n - 1))
        if p <= alpha + 1e-12:
            return n
    return r


def audit_bound(n_total: int, n_robust: int, audited: int, confidence: float = AUDIT_CONFIDENCE
                ) -> float:
    """The overestimate of robust accuracy bounded with ``confidence`` when ``audited`` of the
    ``n_robust`` robust examples, drawn at random without replacement, were all found
    unbroken: (m - 1) / n_total for the smallest m whose chance of hiding from such a sample,
    C(r - m, n) / C(r, n), is at most 1 - ``confidence`` (0 once every robust example was
    audited)."""
    r, n = n_robust, audited
    if n >= r:
        return 0.0
    alpha = 1.0 - confidence
    for m in range(1, r + 1):
        p = 1.0
        for i in range(n):
            p *= max(r - m - i, 0) / (r - i)
        if p <= alpha + 1e-12:
            return (m - 1) / n_total
    return r / n_total


@dataclass(frozen=True)
class Audit:
    """The full AutoAttack protocol re-run, sequentially, on the examples the audited cascade
    left robust, in an order drawn by the seed: ``sample`` the examples audited (indices into
    the evaluated ones), ``missed`` those of them AutoAttack broke, ``plan`` the sample size
    that bounds the overestimate (:func:`audit_plan`), ``bound`` the overestimate bounded
    with ``AUDIT_CONFIDENCE`` (None once a miss was found: the result is an overestimate),
    ``passed`` whether that bound is at most ``AUDIT_TOLERANCE``."""

    sample: Tensor  # int64 indices into the evaluated examples
    missed: int
    reference: CascadeResult
    plan: int = 0
    bound: float | None = None

    @property
    def passed(self) -> bool:
        return self.missed == 0 and self.bound is not None and self.bound <= AUDIT_TOLERANCE


def audit(model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: float,
          audited: CascadeResult, n: int, stages: list[Stage], ctx: RunContext, *,
          clean: CleanPass | None = None, fwd: Forward | None = None,
          progress: ProgressFn | None = None, chunk: int = 16) -> Audit:
    """A sequential audit of ``audited`` by the reference ``stages`` (AutoAttack's standard
    protocol in evaluations). Only an example the cascade left robust can be an
    overestimate, so those are audited, in an order drawn by the job's seed, ``chunk`` at a
    time; the audit stops at the first example the reference breaks (the result is an
    overestimate), once :func:`audit_plan` examples were found unbroken (the overestimate is
    at most ``AUDIT_TOLERANCE`` with ``AUDIT_CONFIDENCE``), or after ``n`` examples, the
    caller's bound on its cost (then :func:`audit_bound` says what the sample shows).
    ``progress`` (default the context's) also carries cancellation."""
    g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + 7919)
    robust = audited.robust.nonzero().squeeze(1)
    order = robust[torch.randperm(robust.numel(), generator=g)]
    total, r = int(x.shape[0]), int(robust.numel())
    plan = audit_plan(total, r)
    limit = min(plan, n, r)
    ref_robust = audited.robust.clone()
    broken_by = audited.broken_by.clone()
    done = missed = 0
    while done < limit and missed == 0:
        idx = order[done:min(done + max(chunk, 1), limit)].sort().values
        ref_clean = None if clean is None else CleanPass(clean.correct[idx], clean.logits[idx])
        part = run_cascade(model, x[idx], y[idx], norm, eps, stages, ctx, clean=ref_clean,
                           fwd=fwd, progress=progress)
        ref_robust[idx] = part.robust
        broken_by[idx] = part.broken_by
        missed += int((~part.robust).sum())
        done += idx.numel()
    sample = order[:done].sort().values
    reference = CascadeResult(audited.clean_correct.clone(), ref_robust, broken_by)
    bound = None if missed else audit_bound(total, r, done)
    return Audit(sample, missed, reference, plan, bound)


def _halve(batch_size: int, err: torch.cuda.OutOfMemoryError) -> int:
    """The next batch size to try after running out of device memory (re-raises at 1)."""
    if batch_size == 1:
        raise err
    torch.cuda.empty_cache()
    return max(batch_size // 2, 1)


def confirm(fwd: Forward, threat: Threat, x: Tensor, y: Tensor, eps: float,
            out: AttackOutput) -> tuple[Tensor, int]:
    """Which outputs are breaks in fp32, inside the ball and the box, with finite values;
    and how many claimed breaks failed that.

    Where the search forward is not the model itself in fp32 (bf16, a folded copy), every
    output is checked, not only the claimed ones: a point the search saw on the right side of
    the boundary may be across it in fp32, and it is a real adversarial example.
    """
    check = out.success if fwd.exact else torch.ones_like(out.success)
    rows = check.nonzero().squeeze(1)
    broke = torch.zeros_like(out.success)
    if rows.numel() == 0:
        return broke, 0
    xa = out.x_adv[rows].float()
    with torch.inference_mode():
        wrong = fwd.fp32(xa).argmax(1) != y[rows]
    ok = wrong & _inside(threat, x[rows], xa, eps)
    broke[rows] = ok
    return broke, int((out.success[rows] & ~ok).sum())


def _inside(threat: Threat, x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    finite = torch.isfinite(x_adv).flatten(1).all(1)
    in_box = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1)
    in_ball = threat.norm_of(x_adv - x) <= eps * (1 + 1e-5) + 1e-6
    return finite & in_box & in_ball


def assert_valid(threat: Threat, x: Tensor, x_adv: Tensor, eps: float) -> None:
    """AutoAttack's final check: every adversarial example in the ball, the box, no NaN."""
    if x.shape[0] == 0:
        return
    ok = _inside(threat, x, x_adv, eps)
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise AssertionError(f"{bad} adversarial examples outside the ball/box or not finite")


def _fingerprint(prefix: str, y: Tensor) -> str:
    return f"{prefix}|n={y.numel()}|y={zlib.crc32(y.numpy().astype(np.int64).tobytes())}"


def _save(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _load_stage(path: Path | None, key: str
                ) -> tuple[Tensor, Tensor, Tensor | None, np.ndarray | None] | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            closest = torch.from_numpy(f["closest"]) if "closest" in f.files else None
            cost = f["cost"] if "cost" in f.files else None
            return (torch.from_numpy(f["robust"]), torch.from_numpy(f["broken_by"]), closest,
                    cost)
    except (OSError, KeyError, ValueError):
        return None  # a torn or foreign file: run the stage again


def merge_states(parts: list[Path], bounds: list[tuple[int, int]], dest: Path,
                 y: Tensor) -> int:
    """Concatenate the saved states of shards (``parts[k]`` ran examples ``bounds[k]`` of
    the whole set, whose labels are ``y``) into ``dest``, as the whole run would have saved
    them: per-example arrays joined in order, costs summed, each file's key made for the whole
    set. A file that is not in every part, or whose key does not say it holds its part's
    examples, is left out (that stage then runs again on the whole set). Returns the files
    written."""
    written = 0
    if not parts:
        return 0
    for first in sorted(parts[0].rglob("*.npz")):
        rel = first.relative_to(parts[0])
        if ".tmp" in rel.name or (dest / rel).exists():
            continue
        loaded: list[dict[str, np.ndarray]] = []
        prefix = ""
        for part, (a, b) in zip(parts, bounds, strict=True):
            try:
                with np.load(part / rel, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except (OSError, KeyError, ValueError):
                break
            key = str(arrays.get("key", ""))
            prefix = prefix or key.rsplit("|n=", 1)[0]
            if (not key or key != _fingerprint(prefix, y[a:b])
                    or set(arrays) != set(loaded[0] if loaded else arrays)
                    or any(v.ndim == 0 for k, v in arrays.items() if k != "key")):
                break
            loaded.append(arrays)
        else:
            merged: dict[str, np.ndarray] = {}
            for name in loaded[0]:
                if name == "key":
                    merged[name] = np.array(_fingerprint(prefix, y))
                elif name == "cost":
                    merged[name] = np.sum([arr[name] for arr in loaded], axis=0)
                else:
                    merged[name] = np.concatenate([arr[name] for arr in loaded])
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            _save(dest / rel, **merged)
            written += 1
    return written
