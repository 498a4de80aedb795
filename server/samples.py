"""Sample request logs kvscope generates itself, so `kvscope replay` has something to show.

- `agent-clock.jsonl`: one agent loop of 20 steps whose system prompt starts
  with the current time, so every step misses the cache right there (the
  classic "timestamp in the system prompt" mistake).
- `workflow.jsonl`: a planner, a coder and a reviewer that share a long
  tools description, taking turns in a fixed step graph (planner -> coder
  -> reviewer -> planner ...), each with its own growing history; under a
  small budget the eviction policy decides which agent's prefix survives
  until its next step (a cycle is least-recently-used eviction's worst
  case: the prefix it drops is the one needed next).

Deterministic: the same files every time. Knows nothing about models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOOLS = (
    "Tools you can call:\n"
    "- search(query): find notes that mention the query and return their lines.\n"
    "- read(note): return the whole text of one note by its name.\n"
    "- write(note, text): replace the text of a note; keep the old one in history.\n"
    "- list(folder): the names of the notes in a folder, newest first.\n"
    "- run(command): run a shell command in the sandbox and return its output.\n"
    "Answer with one tool call a step, then a short reason."
)
TASKS = ("find the code for locker 7", "check which room team Blue meets in", "update the owner of cart 5")


def agent_clock(steps: int = 20) -> list[dict[str, Any]]:
    out = []
    history: list[dict[str, str]] = [{"role": "user", "content": f"Task: {TASKS[0]}."}]
    for k in range(steps):
        minute, second = divmod(41 * 60 + 7 + 23 * k, 60)
        system = f"Current time: 2026-12-07 10:{minute % 60:02d}:{second:02d}.\nYou are a careful agent.\n{TOOLS}"
        out.append(
            {
                "messages": [{"role": "system", "content": system}, *history],
                "max_tokens": 32,
                "agent": "agent",
                "step": k + 1,
                "ts": 1796640000 + 23 * k,
            }
        )
        history += [
            {"role": "assistant", "content": f'search("locker {k + 7}") because the notes may mention it.'},
            {"role": "user", "content": f"Tool result: note {k + 1} says the code for locker {k + 7} is {4821 + k}."},
        ]
    return out


def workflow(rounds: int = 6) -> list[dict[str, Any]]:
    roles = {
        "planner": "You are the planner: split the task into steps for the coder.",
        "coder": "You are the coder: carry out the next step with the tools.",
        "reviewer": "You are the reviewer: check the coder's last step and say what to fix.",
    }
    histories: dict[str, list[dict[str, str]]] = {a: [] for a in roles}
    order = ["planner", "coder", "reviewer"] * rounds
    out = []
    for step, agent in enumerate(order, 1):
        task = TASKS[(step // 7) % len(TASKS)]
        histories[agent].append({"role": "user", "content": f"Step {step}: {task}."})
        system = f"{TOOLS}\n{roles[agent]}"
        out.append(
            {
                "messages": [{"role": "system", "content": system}, *histories[agent]],
                "max_tokens": 32,
                "agent": agent,
                "step": step,
                "ts": 1796640000 + 5 * step,
            }
        )
        histories[agent].append(
            {"role": "assistant", "content": f'{agent} done with step {step}: read("note {step}").'}
        )
    return out


SAMPLES = {"agent-clock": agent_clock, "workflow": workflow}


def write_samples(folder: str | Path) -> list[Path]:
    """Write every sample log into `folder`; returns their paths."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in SAMPLES.items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in make()), encoding="utf-8")
        paths.append(p)
    return paths
