"""``factor``: the paper's policy (docs/architecture.md, The method 6 to 8) with our options.

Per epoch t, with lambda(t) from the schedule:

    B_i(t) = (1 - lambda(t)) R_i + lambda(t) D_i(t)
    s_i(t) = B_i(t) - gamma u_i / max(t, 1)                 (penalty="additive", default)
    s_i(t) = B_i(t) exp(-gamma u_i / (r t + 1))             (penalty="multiplicative")

and the epoch is the top m of s + tau * Gumbel(seed, t, i) (``sampling="gumbel"``, the default,
tau = 1), or with ``sampling="topm"`` the top m of s itself (ties by a seeded hash; the paper's
literal ranking). u_i counts the committed epochs that selected i. The literal form (The method) is
``{"sampling": "topm", "class_quotas": false, "dynamic_coverage": false}``.

Options: ``class_quotas`` (each class keeps its share of every epoch: one stage that takes every
class's top in the same protocol calls, per-class counts by largest remainder over the global class
counts); ``dynamic_coverage`` (global counters
c_j of how many selected samples so far had unit j active; D_i(t) = D_i * sum_j a_ij g(rho_j)
with rho_j = c_j / (p_j S_t), S_t the samples selected so far, g(rho) = 1 / (1 + rho): samples whose
factors are under-covered relative to their frequency keep their diversity, over-covered ones
lose it; equals the literal D before any selection; sum_j a_ij g(rho_j) is one sparse
matrix-vector product per shard and epoch); ``anneal_epochs`` (the last K epochs take all N
samples); ``factor_gamma`` (a factor-level usage penalty, off by default: s_i -= factor_gamma h_i(t)
with h_i(t) = sum_j a_ij c_j / (S_t sum_j a_ij p_j), how much i's factors were used by the
selections so far relative to their frequency, ~1 under a uniform rotation; near-duplicates share
their factors, so selecting one copy lowers every copy: they share one budget).

The options are `FactorParams` (``service.policies.factor_params``).
"""

from __future__ import annotations

from typing import cast

import numpy as np
from saelect.service.policies.base import Policy, PolicyConfig, Stage, add_counts, epoch_size
from saelect.service.policies.factor_params import FactorParams
from saelect.service.policies.factor_scores import ScoreTerms, factor_scores
from saelect.service.schedules import ScheduleConfig, lambda_at
from saelect.service.selection.hashing import STREAM_GUMBEL, gumbel_range
from saelect.workers.shard_data import ShardData

__all__ = ["FactorPolicy", "largest_remainder"]


def _need(data: ShardData, names: tuple[str, ...], who: str) -> list[np.ndarray]:
    """The shard arrays ``names``; ValueError naming the missing ones and who needs them."""
    arrays = [getattr(data, name) for name in names]
    missing = [name for name, arr in zip(names, arrays, strict=True) if arr is None]
    if missing:
        raise ValueError(f"{who} needs {', '.join(missing)} in the shard data")
    return arrays


_CODES = ("code_ids", "code_values", "p")


def largest_remainder(size: int, counts: np.ndarray) -> np.ndarray:
    """int64 (C,) per-class quotas summing to ``size``, proportional to ``counts`` (C,).

    Floors of size * n_c / N, then one more for the largest remainders (ties: lower class id).
    Exact integer arithmetic; every quota is <= its class count when size <= N.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros_like(counts)
    prod = size * counts
    quotas, rem = prod // total, prod % total
    extra = size - int(quotas.sum())
    order = np.lexsort((np.arange(counts.shape[0]), -rem))
    quotas[order[:extra]] += 1
    return quotas


class FactorPolicy(Policy):
    """Representativeness-to-diversity schedule with a usage-frequency penalty."""

    name = "factor"
    params_type = FactorParams
    params: FactorParams

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        if self.params.anneal_epochs > config.epochs:
            raise ValueError(
                f"anneal_epochs={self.params.anneal_epochs} exceeds epochs={config.epochs}"
            )
        self._coverage: np.ndarray | None = None  # float64 (M,) c_j, once codes were seen
        self._selected_total = 0  # S_t: samples selected in committed epochs

    @property
    def schedule(self) -> ScheduleConfig:
        """The validated schedule (``FactorParams`` turns every accepted form into one)."""
        return cast(ScheduleConfig, self.params.schedule)

    def _annealing(self, epoch: int) -> bool:
        return epoch >= self.config.epochs - self.params.anneal_epochs

    # ----------------------------------------------------------------- coordinator side
    def plan(self, num_samples: int) -> list[int]:
        m = epoch_size(self.config.ratio, num_samples)
        return [num_samples if self._annealing(t) else m for t in range(self.config.epochs)]

    def context(self, epoch: int, partials: list[dict], ctx: dict | None = None) -> dict:
        out = super().context(epoch, partials, ctx)
        out["lambda"] = lambda_at(epoch, self.config.epochs, self.schedule)
        out["anneal"] = self._annealing(epoch)
        quotas = self.params.class_quotas is not False and all(
            "class_counts" in p for p in partials
        )
        if quotas and not out["anneal"]:
            counts = add_counts([p["class_counts"] for p in partials])
            out["quotas"] = largest_remainder(out["size"], counts).tolist()
        out["dynamic"] = self.params.dynamic_coverage is not False and all(
            p.get("has_codes", False) for p in partials
        )
        if out["dynamic"] or self.params.factor_gamma > 0:
            out["coverage"] = self._coverage
            out["selected_total"] = self._selected_total
        return out

    def stages(self, epoch: int, ctx: dict) -> list[Stage]:
        if ctx["anneal"]:
            return [Stage("all", ctx["size"])]
        if "quotas" in ctx:
            return [Stage("classes", int(ctx["size"]), tuple(ctx["quotas"]))]
        return [Stage("main", ctx["size"])]

    def absorb(self, epoch: int, partials: list[dict]) -> None:
        self._selected_total += int(sum(p["selected"] for p in partials))
        counts = [p["unit_counts"] for p in partials if "unit_counts" in p]
        if counts:
            total = np.sum(counts, axis=0).astype(np.float64)
            self._coverage = total if self._coverage is None else self._coverage + total

    def epoch_stats(self, epoch: int, ctx: dict, partials: list[dict]) -> dict:
        size = sum(p["count"] for p in partials)
        mag_b = sum(p["abs_base"] for p in partials)
        mag_p = sum(p["abs_penalty"] for p in partials)
        out = {
            "lambda": ctx["lambda"],
            "mean_R": sum(p["sum_R"] for p in partials) / size if size else None,
            "mean_D": sum(p["sum_D"] for p in partials) / size if size else None,
            "penalty_share": mag_p / (mag_b + mag_p) if mag_b + mag_p > 0 else 0.0,
            "factor_coverage": None,
        }
        units = [p for p in partials if "unit_counts" in p]
        if units:
            c = np.sum([p["unit_counts"] for p in units], axis=0).astype(np.float64)
            if self._coverage is not None:
                c = c + self._coverage
            live = int(units[0]["live_units"])
            out["factor_coverage"] = float(np.count_nonzero(c)) / live if live else None
        return out

    def state_dict(self) -> dict:
        return {"coverage": self._coverage, "selected_total": self._selected_total}

    def load_state_dict(self, state: dict) -> None:
        cov = state.get("coverage")
        self._coverage = None if cov is None else np.asarray(cov, dtype=np.float64).copy()
        self._selected_total = int(state["selected_total"])

    # ----------------------------------------------------------------- shard side
    def local_stats(
        self, epoch: int, data: ShardData, counters: dict[str, np.ndarray], ctx: dict | None
    ) -> dict:
        _need(data, ("R", "D"), "policy 'factor'")
        if self.params.dynamic_coverage:
            _need(data, _CODES, "dynamic_coverage")
        if self.params.factor_gamma > 0:
            _need(data, _CODES, "factor_gamma")
        out: dict = {"has_codes": all(getattr(data, name) is not None for name in _CODES)}
        if self.params.class_quotas:
            _need(data, ("labels",), "class_quotas")
        if self.params.class_quotas is not False and data.labels is not None:
            out["class_counts"] = data.derived.class_counts()
        return out

    def _profile(self, ctx: dict, data: ShardData) -> np.ndarray | None:
        """float32 (n,) h_i = sum_j a_ij g(rho_j) / sum_j a_ij of every local sample, or None
        while dynamic coverage is off or nothing was selected yet (D is used as it is)."""
        total = ctx.get("selected_total", 0)
        if not ctx.get("dynamic") or not total or ctx.get("coverage") is None:
            return None
        _need(data, _CODES, "dynamic_coverage")
        p = np.asarray(data.p, dtype=np.float64)  # (M,)
        expected = p * total
        rho = np.divide(ctx["coverage"], expected, out=np.zeros_like(p), where=expected > 0)
        g = (1.0 / (1.0 + rho)).astype(np.float32)  # (M,)
        return data.derived.profile_dot(g)  # memoized: the stats ask again

    def _diversity(
        self, ctx: dict, data: ShardData, idx: np.ndarray | None, D_at: np.ndarray | None = None
    ) -> np.ndarray:
        """D_i(t) for the local positions idx (all when None), float64; ``D_at``: D already
        taken at idx."""
        (D_all,) = _need(data, ("D",), "policy 'factor'")
        D = D_all if idx is None else D_all[idx] if D_at is None else D_at
        h = self._profile(ctx, data)
        if h is None:
            return D
        return np.multiply(D, h if idx is None else h[idx], dtype=np.float64)

    def _parts(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        idx: np.ndarray | None,
        gathered: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, penalty) float64 at local positions idx (all when None); penalty None if gamma = 0.

        Score = B - penalty (the penalty is in score units for both forms). ``gathered``: R and D
        already taken at idx, (len(idx),) each.
        """
        (R_all,) = _need(data, ("R",), "policy 'factor'")
        lam = float(ctx["lambda"])
        R = R_all if idx is None else R_all[idx] if gathered is None else gathered[0]
        B = np.multiply(R, 1.0 - lam)
        D_at = None if gathered is None else gathered[1]
        tmp = np.multiply(self._diversity(ctx, data, idx, D_at), lam)
        B += tmp
        fpen = self._factor_usage_penalty(ctx, data, idx)
        gamma = self.params.gamma
        if gamma == 0:
            return B, fpen
        u = counters["usage"] if idx is None else counters["usage"][idx]
        if self.params.penalty == "additive":
            np.multiply(u, gamma / max(epoch, 1), out=tmp)
        else:
            np.multiply(u, -gamma / (self.config.ratio * epoch + 1.0), out=tmp)
            np.expm1(tmp, out=tmp)
            np.multiply(tmp, B, out=tmp)
            np.negative(tmp, out=tmp)
        if fpen is not None:
            tmp += fpen
        return B, tmp

    def _factor_usage_penalty(
        self, ctx: dict, data: ShardData, idx: np.ndarray | None
    ) -> np.ndarray | None:
        """factor_gamma h_i(t) float64 at local positions idx, or None (off or nothing used)."""
        total = ctx.get("selected_total", 0)
        if self.params.factor_gamma == 0 or not total or ctx.get("coverage") is None:
            return None
        _need(data, _CODES, "factor_gamma")
        p = np.asarray(data.p, dtype=np.float64)  # (M,)
        used = data.derived.profile_dot(np.asarray(ctx["coverage"], dtype=np.float64) / total)
        base = data.derived.profile_dot(p)  # (n,) float32; the activation mass cancels
        h = np.divide(used, base, out=np.zeros_like(used), where=base > 0)
        h = h if idx is None else h[idx]
        return np.multiply(h, self.params.factor_gamma, dtype=np.float64)

    def local_scores(
        self, stage: Stage, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        return self.local_scores_into(stage, epoch, ctx, data, counters, None)

    def local_scores_into(
        self,
        stage: Stage,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        out: np.ndarray | None,
    ) -> np.ndarray:
        """:meth:`local_scores` written into ``out`` (float64 (n,), a shard's reused buffer)
        when given: one blocked pass (`service.policies.factor_scores`), no full-length
        temporaries; the same values as the unblocked formula."""
        if stage.key == "all":
            return np.zeros(data.n)
        R, D = _need(data, ("R", "D"), "policy 'factor'")
        if R.dtype != np.float64 or D.dtype != np.float64:  # keep their own arithmetic
            return self._scores_unblocked(epoch, ctx, data, counters)
        h = self._profile(ctx, data)
        fpen = self._factor_usage_penalty(ctx, data, None)
        gamma = self.params.gamma
        penalty: str | None = None if gamma == 0 else self.params.penalty
        if penalty == "multiplicative":
            coef = -gamma / (self.config.ratio * epoch + 1.0)
        else:
            coef = gamma / max(epoch, 1)
        noisy = self.params.sampling == "gumbel" and self.params.tau > 0
        terms = ScoreTerms(
            float(ctx["lambda"]),
            penalty,
            coef,
            self.config.seed if noisy else None,
            epoch,
            self.params.tau,
        )
        return factor_scores(R, D, h, counters["usage"], fpen, terms, data.lo, out)

    def _scores_unblocked(
        self, epoch: int, ctx: dict, data: ShardData, counters: dict[str, np.ndarray]
    ) -> np.ndarray:
        """The scores by whole-array passes (R or D not float64: their own precision)."""
        s, pen = self._parts(epoch, ctx, data, counters, None)
        if pen is not None:
            s -= pen
        if self.params.sampling == "gumbel" and self.params.tau > 0:
            noise = gumbel_range(self.config.seed, epoch, STREAM_GUMBEL, data.lo, data.hi)
            if self.params.tau != 1.0:  # 1.0 * x == x: the default skips a pass
                noise *= self.params.tau
            s += noise
        return s

    def _unit_counts(self, data: ShardData, selected_local: np.ndarray) -> dict:
        if data.code_ids is None or data.code_values is None or data.p is None:
            return {}
        return {"unit_counts": data.derived.unit_counts(selected_local)}  # memoized per array

    def selection_partials(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        R, D = _need(data, ("R", "D"), "policy 'factor'")
        R_sel, D_sel = R[selected_local], D[selected_local]  # (m_s,) each, gathered once
        B, pen = self._parts(epoch, ctx, data, counters, selected_local, (R_sel, D_sel))
        out = {
            "count": int(selected_local.shape[0]),
            "sum_R": float(R_sel.sum()),
            "sum_D": float(D_sel.sum()),
            "abs_base": float(np.abs(B).sum()),
            "abs_penalty": 0.0 if pen is None else float(np.abs(pen).sum()),
        }
        unit_counts = self._unit_counts(data, selected_local)
        if unit_counts:
            (p,) = _need(data, ("p",), "factor coverage")  # present: unit counts need it
            out.update(unit_counts, live_units=int(np.count_nonzero(p > 0)))
        return out

    def commit(
        self,
        epoch: int,
        ctx: dict,
        data: ShardData,
        counters: dict[str, np.ndarray],
        selected_local: np.ndarray,
    ) -> dict:
        return {"selected": int(selected_local.shape[0]), **self._unit_counts(data, selected_local)}
