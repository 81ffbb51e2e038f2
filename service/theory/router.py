"""``POST /theory``: the linear theory of adversarial vs natural distributional robustness.

It needs no model and no GPU (a convex 2-D problem per eps, solved in milliseconds with
numpy), so it answers synchronously in the API process.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from core.errors import Invalid, problem_responses
from service.http.deps import CurrentOwner
from service.theory.solver import LinearSetting, solve

router = APIRouter(tags=["theory"])

NormName = Literal["l1", "l2", "linf"]
ALL_NORMS: list[NormName] = ["l1", "l2", "linf"]


class TheoryIn(BaseModel):
    """A linear setting with a core and a spurious feature, and the budgets to solve it at."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "s_c": 1.0, "s_s": 1.0, "rho": 0.9, "s_n": 0.5, "norms": ["l2", "linf"],
        "eps": [0.0, 0.1, 0.3], "rho_shift": 0.0}]})

    s_c: float = Field(1.0, gt=0, le=1e3, description="scale of the core feature")
    s_s: float = Field(1.0, gt=0, le=1e3, description="scale of the spurious feature")
    rho: float = Field(0.9, ge=-1, le=1, description="train-time correlation of the spurious "
                                                     "feature with the label")
    s_n: float = Field(0.5, ge=0, le=1e3, description="label noise")
    norms: list[NormName] = Field(default_factory=lambda: list(ALL_NORMS), min_length=1,
                                  max_length=3, description="the threat norms to solve for: "
                                                            "`l1`, `l2`, `linf`")
    eps: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5], min_length=1,
                             max_length=200, description="the perturbation budgets to solve at "
                                                         "(0 is the standard, non-robust solution)")
    rho_shift: float = Field(0.0, ge=-1, le=1, description="test-time correlation")


@router.post("/theory", responses=problem_responses(401, 422))
def theory(body: TheoryIn, owner: CurrentOwner) -> dict[str, Any]:
    """Optimal weights and in-distribution / shifted risks per norm and eps."""
    setting = LinearSetting(s_c=body.s_c, s_s=body.s_s, rho=body.rho, s_n=body.s_n)
    try:
        return solve(setting, body.norms, body.eps, body.rho_shift)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
