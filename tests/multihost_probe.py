"""Run under `train.launch` by test_multihost: the distributed helpers on real JAX processes.

python -m train.launch --processes 2 --devices-per-process 2 --module tests.multihost_probe -- DIR
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from train import distributed
from train.errors import UserError

joined = distributed.initialize()
index = jax.process_index()
mesh = jax.make_mesh((jax.device_count(),), ("data",))
rows = np.arange(24 * 3).reshape(24, 3)  # every process could build every row ...
asked = []


def rows_of(ids):
  asked.extend(int(i) for i in ids)  # ... but must build only its own
  return {"x": rows[ids]}


batch = distributed.put_rows(
  rows_of, np.arange(24)[::-1], NamedSharding(mesh, PartitionSpec("data"))
)
total = jax.jit(lambda x: x.sum(axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
try:
  distributed.share_from_main(lambda: (_ for _ in ()).throw(UserError("main says no")))
  error = None
except UserError as e:
  error = str(e)
result = {
  "joined": joined,
  "asked": asked,
  "gathered": distributed.to_host(batch["x"]).tolist(),
  "sum": np.asarray(total(batch["x"])).tolist(),
  "shared": distributed.share_from_main(lambda: {"run": "from process 0", "by": index}),
  "error": error,
}
Path(sys.argv[1], f"{index}.json").write_text(json.dumps(result))
