"""The leaderboard's rows, as the API and the page show them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class LeaderboardRow(BaseModel):
    rank: int = Field(description="1 for the best value; ties keep the earlier evaluation first")
    value: float = Field(description="the metric's value")
    params: dict[str, Any] = Field(description="the result row's parameters (attack, norm, eps…)")
    n: int | None = Field(None, description="for an accuracy: the examples it counts")
    interval: tuple[float, float] | None = Field(
        None, description="for an accuracy: its 95% Wilson score interval [low, high]")
    evaluation_id: uuid.UUID = Field(description="the evaluation the value comes from")
    model_id: uuid.UUID | None = Field(description="its model (null once deleted)")
    model_name: str = Field(description="the model's name when it was evaluated")
    owner: str = Field(description="who ran the evaluation")
    public: bool = Field(description="whether every key sees this row")
    finished_at: datetime | None = Field(description="when the evaluation finished")


class Leaderboard(BaseModel):
    dataset: str = Field(description="the dataset ranked on")
    benchmark: str = Field(description="the benchmark whose metric ranks")
    metric: str = Field(description="the metric that ranks")
    threat: str | None = Field(description="`NORM` or `NORM:EPS`, when the rows were filtered")
    order: str = Field(description="`descending` (higher is better) or `ascending`")
    rows: list[LeaderboardRow] = Field(description="best first")
