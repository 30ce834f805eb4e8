"""With packed rows, the S5 state resets at each document start, so a document's outputs
do not depend on its neighbours. Oracle: the same document run on its own."""

import jax
import numpy as np
import pytest


from s5scale.nn.model import S5Model
from tests.helpers import tiny_config


@pytest.mark.parametrize("bidirectional", [False, True])
def test_second_document_ignores_the_first(bidirectional):
  config = tiny_config(model__bidirectional=bidirectional)
  model = S5Model.from_config(config.model)
  rng = np.random.default_rng(0)
  doc_b = rng.integers(0, 256, 30)
  first_docs = [rng.integers(0, 256, 20), rng.integers(0, 256, 20)]
  after = rng.integers(0, 256, 14)  # a third document (matters to the backward scan)
  rows = np.stack([np.concatenate([a, doc_b, after]) for a in first_docs]).astype(np.int32)
  reset = np.zeros(rows.shape, bool)
  reset[:, [0, 20, 50]] = True
  variables = model.init(jax.random.PRNGKey(0), rows)
  packed = np.asarray(model.apply(variables, rows, reset=reset))

  alone = np.asarray(model.apply(variables, doc_b[None].astype(np.int32)))[0]
  for row in packed:
    np.testing.assert_allclose(row[20:50], alone, rtol=1e-5, atol=1e-5)
  # Without resets the same rows do depend on the first document: the test can fail.
  unreset = np.asarray(model.apply(variables, rows))
  assert np.abs(unreset[0, 20:50] - unreset[1, 20:50]).max() > 1e-3
