"""Preference data as the training library sees it: comparisons and single rated responses.

The record types live in the ground package (core/records.py), so `store/` returns them and `training/` learns from
them without either importing the other; they are re-exported here for the training code.
"""

from __future__ import annotations

from core.records import Comparison, Message, Rated

__all__ = ["Comparison", "Message", "Rated", "prompt_key"]


def prompt_key(prompt: list[Message]) -> str:
    """A stable key for a prompt, used to split train/held-out by prompt rather than by pair."""
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)
