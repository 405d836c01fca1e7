"""Programs that share the machine in turn, so that their timings see the same machine.

On a machine whose speed drifts by tens of percent within minutes, two programs timed one
after the other are timed on different machines. Here they run side by side instead and
take turns: only the process that holds the turn computes, the others wait on a pipe
(using no CPU), and the turn goes round every block of timed work (50 training steps in
the amortized suite), so a slow minute slows every program alike.

- The parent calls :func:`run_in_turn` with the commands. It starts each one when its
  first turn comes (so start-up and compilation run alone too), hands it the turn by
  writing one byte to its ``go`` pipe, and waits until the child gives the turn back (one
  byte on its ``done`` pipe) or exits (end of file); then the next process gets the turn.
- A child finds its pipes with :meth:`Turn.from_environment` (``None`` when it runs on its
  own) and calls the ``Turn`` before each block of timed work: that gives back the turn
  it holds and waits for the next one. After its last call it keeps the turn until it
  exits, so the work it does last (evaluation, inference timing) runs alone.

A child that never calls its ``Turn`` simply runs to its end while the others wait.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

ENVIRONMENT_VARIABLE = "JAXREG_BENCH_TURN_FDS"


class Turn:
    """A child's side: ``turn()`` gives back the turn it holds (if any) and waits for the next."""

    def __init__(self, go_fd: int, done_fd: int):
        self.go_fd, self.done_fd = go_fd, done_fd
        self.holding = False
        self.alone = False  # the parent has gone: carry on without turns

    @classmethod
    def from_environment(cls) -> "Turn | None":
        spec = os.environ.get(ENVIRONMENT_VARIABLE)
        if not spec:
            return None
        go_fd, done_fd = (int(part) for part in spec.split(","))
        return cls(go_fd, done_fd)

    def __call__(self) -> None:
        if self.alone:
            return
        try:
            if self.holding:
                os.write(self.done_fd, b"\x01")
                self.holding = False
            self.holding = os.read(self.go_fd, 1) != b""
        except BrokenPipeError:
            self.holding = False
        self.alone = not self.holding


class _Child:
    def __init__(self, command, log_path, env, cwd):
        self.command, self.log_path, self.env, self.cwd = command, log_path, env, cwd
        self.proc = None
        self.go_w = self.done_r = None
        self.turns = 0
        self.timed_out = False

    def start(self):
        go_r, self.go_w = os.pipe()
        self.done_r, done_w = os.pipe()
        env = dict(self.env, **{ENVIRONMENT_VARIABLE: f"{go_r},{done_w}"})
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                         pass_fds=(go_r, done_w), start_new_session=True)
        # Only the child may hold these ends, or the parent would never see it finish.
        os.close(go_r)
        os.close(done_w)

    def give_turn(self, deadline: float) -> bool:
        """Hand this child the turn and wait for it back; False once the child has exited."""
        self.turns += 1
        try:
            os.write(self.go_w, b"\x01")
        except BrokenPipeError:  # exited without reading: its done pipe is at end of file too
            pass
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return False
            ready, _, _ = select.select([self.done_r], [], [], min(left, 60.0))
            if ready:
                return os.read(self.done_r, 1) != b""

    def kill(self):
        if self.proc.poll() is None:
            self.timed_out = True
            os.killpg(self.proc.pid, 9)  # our own child's group

    def finish(self) -> int:
        self.proc.wait()
        for fd in (self.go_w, self.done_r):
            os.close(fd)
        return self.proc.returncode


def run_in_turn(jobs, *, timeout: float, cwd: str | None = None) -> list[dict]:
    """Run ``jobs`` (``(command, log_path, env)`` each) side by side, one turn at a time,
    round and round in the order given, until all have exited or ``timeout`` seconds (for
    all of them together) have passed; then the rest are killed. Returns per job its
    ``returncode``, ``timed_out`` and ``turns`` (how many turns it was given)."""
    children = [_Child(command, log_path, env, cwd) for command, log_path, env in jobs]
    deadline = time.monotonic() + timeout
    waiting = list(children)
    try:
        while waiting:
            for child in list(waiting):
                if child.proc is None:
                    child.start()
                if not child.give_turn(deadline):
                    waiting.remove(child)
                    child.finish()
    finally:
        for child in children:
            if child.proc is not None and child.proc.returncode is None:
                child.kill()
                child.finish()
    return [{"returncode": c.proc.returncode if c.proc else None, "timed_out": c.timed_out, "turns": c.turns}
            for c in children]
