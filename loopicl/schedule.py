"""When things happen in a run: the loop curriculum and the chunk plan (pure functions of the config).

Steps are grouped into chunks (one `lax.scan` each, one dispatch), cut at multiples of
`train.steps_per_call`, at every curriculum change and — for a run that writes files — at every
evaluation, checkpoint and log step.  Boundaries are multiples, so a resumed run groups its steps
the way the uninterrupted one did; chunking changes the dispatch count, never the numbers.
"""
from __future__ import annotations


def loops_at(config, step: int) -> int:
  """Loops trained at `step`: the loop curriculum grows from curriculum_start to model.loops."""
  t, T = config.train, int(config.model.loops)
  if t.curriculum_start <= 0:
    return T
  return min(T, int(t.curriculum_start) + (step // int(t.curriculum_every)) * int(t.curriculum_increment))


def next_boundary(config, step: int, total: int, events: bool = True) -> int:
  """The first step after `step` at which a chunk must end: a multiple of steps_per_call, a
  curriculum change, the end and (with `events`) an evaluation, checkpoint or log step."""
  t = config.train
  every = [int(t.steps_per_call)]
  if t.curriculum_start > 0:
    every.append(int(t.curriculum_every))
  if events:
    every += [int(config.eval.every), int(config.checkpoint.every), int(t.log_every)]
  return min([total] + [(step // e + 1) * e for e in every])


def chunk_plan(config, events: bool = False, start: int = 0) -> list[tuple[int, int, int]]:
  """[(first_step, length, loops)]: the chunks from `start` to `train.steps` (`next_boundary`)."""
  total, out, step = int(config.train.steps), [], int(start)
  while step < total:
    end = next_boundary(config, step, total, events)
    out.append((step, end - step, loops_at(config, step)))
    step = end
  return out


def is_event(step: int, every: int, total: int) -> bool:
  """An event (evaluation, checkpoint, log) happens every `every` steps and at the end."""
  return step % int(every) == 0 or step == total
