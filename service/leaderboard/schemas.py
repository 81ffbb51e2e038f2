"""The leaderboard's rows, as the API and the page show them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class FailedCheck(BaseModel):
    name: str = Field(description="the check, e.g. `degenerate_predictions`")
    detail: str = Field(description="what it found")
    entry: int | None = Field(description="the suite entry (0-based) it ran with, if one")


class LeaderboardRow(BaseModel):
    rank: int = Field(description="1 for the best; every flagged evaluation ranks below every "
                                  "unflagged one; ties keep the earlier evaluation first")
    value: float = Field(description="the metric's value (an evaluation that measured it twice "
                                     "at the threat: its least favourable)")
    params: dict[str, Any] = Field(description="the result row's parameters (attack, norm, eps…)")
    n: int | None = Field(None, description="for an accuracy: the examples it counts")
    interval: tuple[float, float] | None = Field(
        None, description="for an accuracy: its 95% Wilson score interval [low, high]")
    flagged: bool = Field(description="true if any sanity check of the evaluation failed "
                                      "(e.g. `degenerate_predictions`): its value is not to "
                                      "be trusted as it stands")
    failed_checks: list[FailedCheck] = Field(description="the evaluation's failed checks")
    evaluation_id: uuid.UUID = Field(description="the evaluation the value comes from")
    model_id: uuid.UUID | None = Field(description="its model (null once deleted)")
    model_name: str = Field(description="the model's name when it was evaluated")
    owner: str = Field(description="who ran the evaluation")
    public: bool = Field(description="whether every key sees this row")
    finished_at: datetime | None = Field(description="when the evaluation finished")


class ThreatOption(BaseModel):
    attack: str | None = Field(description="the attack (null for a robustness curve)")
    norm: str = Field(description="`linf`, `l2` or `l1`")
    eps: float = Field(description="the budget")
    evaluations: int = Field(description="how many visible evaluations measured it")


class Leaderboard(BaseModel):
    dataset: str = Field(description="the dataset ranked on")
    benchmark: str = Field(description="the benchmark whose metric ranks")
    metric: str = Field(description="the metric that ranks")
    threat: str | None = Field(description="`NORM:EPS` of the one threat ranked (asked for, or "
                                           "the dataset's standard one); null for a benchmark "
                                           "without threats")
    attack: str | None = Field(None, description="the one attack ranked (adversarial)")
    order: str = Field(description="`descending` (higher is better) or `ascending`")
    rows: list[LeaderboardRow] = Field(description="best first, flagged evaluations last")
    threats: list[ThreatOption] = Field(
        default_factory=list, description="the threats measured on this dataset, to rank by")
