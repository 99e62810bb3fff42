"""Orbax CheckpointManager for training: state (trainable weights, optimizer, step), the data
iterators' state and the config, saved together as one atomic, numbered checkpoint."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

Pytree = Any


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory` (Orbax writes into a temporary folder
  and renames, so a preempted save never leaves a half checkpoint that would be restored)."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Pytree, data_state: dict, config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))

  def restore(self, step: int, abstract_state: Pytree) -> tuple[Pytree, dict, dict]:
    """(state placed as `abstract_state`'s shardings, data state, config dict)."""
    r = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return r.state, r.data, r.config

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Pytree, shardings: Pytree) -> Pytree:
  """ShapeDtypeStructs carrying the target shardings, so Orbax restores straight into place
  (and reshards when the mesh changed)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)
