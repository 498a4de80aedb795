"""LiveTokens: what a session view draws between two snapshots.

While a turn streams, the engine thread is inside `chat` and a snapshot
waits behind it, so the view shows the newest snapshot plus the tokens
sampled since (`TokenSampled`), as computed rows at the next positions.

Promises:
- a streamed token is drawn as its own token piece when any snapshot has
  shown that token id before, else as the streamed text; a token whose
  text the detokenizer still holds back (a partial UTF-8 character) is
  drawn as "…" (pending), never as an empty "∅" box;
- the new prompt tokens of the turn (`TurnStarted.prompt_tokens` minus the
  snapshot's) are drawn as pending rows before the streamed ones, so
  streamed tokens sit at their true index and position;
- the header figures (tokens, blocks, KiB, next position) count the
  prompt and streamed tokens too, so they move while the answer streams (KiB is the
  snapshot's bytes per token times the tokens: every row of a layer has
  the same size);
- `clear()` when the snapshot that contains them arrives.

Knows nothing about widgets.
"""

from __future__ import annotations

import numpy as np

from kvscope.engine.blocks import TokenState
from kvscope.engine.snapshot import SessionSnapshot

PENDING = "…"


class LiveTokens:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.texts: list[str] = []
        self._pieces: dict[int, str] = {}
        self._learned_from: int = -1
        self.prompt_total: int | None = None  # context length after this turn's prompt

    def __len__(self) -> int:
        return len(self.ids)

    def start_turn(self, prompt_tokens: int) -> None:
        self.clear()
        self.prompt_total = prompt_tokens

    def add(self, token_id: int, text: str) -> None:
        self.ids.append(token_id)
        self.texts.append(text)

    def clear(self) -> None:
        self.ids.clear()
        self.texts.clear()
        self.prompt_total = None

    def _prompt_extra(self, snap: SessionSnapshot) -> int:
        return max(0, self.prompt_total - snap.n_tokens) if self.prompt_total is not None else 0

    def n_extra(self, snap: SessionSnapshot) -> int:
        """Rows drawn beyond the snapshot: pending prompt tokens plus streamed ones."""
        return self._prompt_extra(snap) + len(self.ids)

    def learn(self, snap: SessionSnapshot) -> None:
        """Remember the token pieces a snapshot shows (id -> piece)."""
        if id(snap) == self._learned_from:
            return
        self._learned_from = id(snap)
        self._pieces.update(zip(snap.token_ids.tolist(), snap.token_text, strict=False))

    def shown(self, i: int) -> str:
        """The text drawn for streamed token i."""
        piece = self._pieces.get(self.ids[i])
        if piece is not None:
            return piece
        return self.texts[i] or PENDING

    def arrays(self, snap: SessionSnapshot) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
        """Token states `[layers, n]`, texts and positions: the snapshot plus the streamed tokens."""
        k = self.n_extra(snap)
        if not k:
            return snap.token_state, snap.token_text, snap.positions
        extra = np.full((snap.n_layers, k), TokenState.COMPUTED, np.uint8)
        texts = (PENDING,) * self._prompt_extra(snap) + tuple(self.shown(i) for i in range(len(self.ids)))
        return (
            np.concatenate([snap.token_state, extra], axis=1),
            snap.token_text + texts,
            np.concatenate([snap.positions, np.arange(snap.offset, snap.offset + k)]),
        )

    def next_position(self, snap: SessionSnapshot) -> int:
        """The RoPE position the next token will take (appended rows take one position each)."""
        return snap.offset + self.n_extra(snap)

    def header(self, snap: SessionSnapshot) -> str:
        n = snap.n_tokens + self.n_extra(snap)
        per_token = snap.nbytes / snap.n_tokens if snap.n_tokens else 0.0
        kib = per_token * n / 1024
        blocks = -(-n // snap.block_size)
        return f"{n} tokens · {blocks} blocks · {kib:.0f} KiB · next position {self.next_position(snap)}"
