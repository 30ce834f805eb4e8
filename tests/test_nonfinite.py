"""Non-finite updates are skipped and counted; a streak of train.max_bad_steps exits 2
and leaves the last good checkpoint byte-for-byte as it was (oracle: the files on disk)."""


from tests import helpers


def test_nonfinite_streak_exits_2_and_keeps_last_good_checkpoint(tmp_path):
  good = helpers.run("train", "text_small.py", tmp_path,
                  helpers.overrides(train__num_steps=3, checkpoint__every_steps=3))
  assert good.returncode == 0, good.stderr[-3000:]
  before = helpers.tree_digest(tmp_path / "checkpoints")

  # A learning rate of 1e30 passes validation (finite, >= 0), but the norm of every update it
  # scales overflows float32, so every update is non-finite from the first resumed step on.
  bad = helpers.run("train", "text_small.py", tmp_path, helpers.overrides(
      train__num_steps=20, checkpoint__every_steps=1, train__max_bad_steps=4,
      optim__learning_rate=1e30, optim__ssm_learning_rate=1e30))
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert "4 consecutive non-finite updates" in bad.stderr
  records = helpers.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["skipped_steps"] for r in records if r["step"] > 3] == [1, 2, 3, 4]
  assert helpers.tree_digest(tmp_path / "checkpoints") == before
