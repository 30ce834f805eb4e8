# The results-* targets: one target per result in docs/results.md, included by the Makefile.
# Figures, wall times and what each target needs first: docs/results.md.

.PHONY: results results-text results-audio results-classify curves results-audio-whole-clips \
	results-samples results-samples-60min results-zero-shot results-classify-full-band \
	results-context results-s4d-classify results-s4d-text results-carried

# The text, audio and classifier results, then the learning curves (docs/results.md).
results: results-text results-audio results-classify curves

# The byte-level LM of `make train` (docs/results.md#text).
results-text: train

DIGITS := data/spoken_digits
$(DIGITS)/.complete: | venv
	$(PY) tools/make_spoken_digits.py --output=$(DIGITS)
	touch $@

# The audio LM on spoken digits: train, evaluate, sample (docs/results.md#audio).
AUDIO_WORKDIR ?= workdirs/spoken_digits_lm
results-audio: venv $(DIGITS)/.complete
	$(PY) -m s5scale.train --config=configs/spoken_digits_lm.py --workdir=$(AUDIO_WORKDIR)
	$(PY) -m s5scale.evaluate --config=configs/spoken_digits_lm.py --workdir=$(AUDIO_WORKDIR) --all
	$(PY) -m s5scale.generate --config=configs/spoken_digits_lm.py --workdir=$(AUDIO_WORKDIR)

# The digit classifier at 16 kHz, then zero-shot at 8 kHz (docs/results.md#classification).
CLASSIFY_WORKDIR ?= workdirs/speech_commands
CLASSIFY_FLAGS ?=
results-classify: venv $(DIGITS)/.complete
	$(PY) -m s5scale.train --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  $(CLASSIFY_FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  --all $(CLASSIFY_FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  --all --config.data.sample_rate=8000 --config.data.seq_len=8000 --config.eval.step_rescale=2 \
	  $(CLASSIFY_FLAGS)

# The classifier on full-band clips only, with every zero-shot diagnostic (docs/results.md#zero-shot-at-8-khz).
results-classify-full-band: venv $(DIGITS)/.complete
	$(MAKE) results-classify results-zero-shot CLASSIFY_WORKDIR=workdirs/speech_commands_full_band \
	  CLASSIFY_FLAGS=--config.data.bandlimit_prob=0

# The audio LM on whole one-second clips instead of crops (docs/results.md#audio).
WHOLE_AUDIO_WORKDIR := workdirs/spoken_digits_lm_whole_clips
WHOLE_AUDIO_FLAGS := --config.data.batch_size=1 --config.data.seq_len=16000 \
  --config.train.num_steps=950 --config.checkpoint.every_steps=475
results-audio-whole-clips: venv $(DIGITS)/.complete
	$(PY) -m s5scale.train --config=configs/spoken_digits_lm.py --workdir=$(WHOLE_AUDIO_WORKDIR) \
	  $(WHOLE_AUDIO_FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/spoken_digits_lm.py --workdir=$(WHOLE_AUDIO_WORKDIR) \
	  --step=950 $(WHOLE_AUDIO_FLAGS)
	$(MAKE) results-samples AUDIO_WORKDIR=$(WHOLE_AUDIO_WORKDIR) SAMPLE_FLAGS="$(WHOLE_AUDIO_FLAGS) --step=950"

# The results-audio recipe trained for 60 minutes, every checkpoint's samples scored (docs/results.md#sample-quality).
LONG_AUDIO_WORKDIR := workdirs/spoken_digits_lm_60min
LONG_AUDIO_FLAGS := --config.train.num_steps=2300 --config.checkpoint.every_steps=575
results-samples-60min: venv $(DIGITS)/.complete
	$(PY) -m s5scale.train --config=configs/spoken_digits_lm.py --workdir=$(LONG_AUDIO_WORKDIR) \
	  $(LONG_AUDIO_FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/spoken_digits_lm.py --workdir=$(LONG_AUDIO_WORKDIR) \
	  --step=2300 $(LONG_AUDIO_FLAGS)
	$(MAKE) results-samples AUDIO_WORKDIR=$(LONG_AUDIO_WORKDIR) SAMPLE_FLAGS="$(LONG_AUDIO_FLAGS)"

# The audio LM's samples scored by the classifier; SAMPLE_FLAGS e.g. --step=1100 --config.generate.seed=1 (docs/results.md#sample-quality).
NUM_SAMPLES ?= 256
SAMPLE_FLAGS ?=
results-samples: venv $(DIGITS)/.complete
	$(PY) -m s5scale.sample_quality --config=configs/spoken_digits_lm.py --workdir=$(AUDIO_WORKDIR) \
	  --classifier_workdir=$(CLASSIFY_WORKDIR) --num_samples=$(NUM_SAMPLES) $(SAMPLE_FLAGS)

# The zero-shot gap's candidate causes on every classifier checkpoint (docs/results.md#zero-shot-at-8-khz).
BN_BATCHES ?= 25
results-zero-shot: venv $(DIGITS)/.complete
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  --all $(CLASSIFY_FLAGS) --config.eval.recompute_batch_stats=$(BN_BATCHES)
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  --all $(CLASSIFY_FLAGS) --config.eval.lowpass_hz=4000
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  --all $(CLASSIFY_FLAGS) --config.eval.lowpass_hz=4000 \
	  --config.eval.recompute_batch_stats=$(BN_BATCHES)
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(CLASSIFY_WORKDIR) \
	  --all $(CLASSIFY_FLAGS) --config.data.sample_rate=8000 --config.data.seq_len=8000 \
	  --config.eval.step_rescale=2 --config.eval.recompute_batch_stats=$(BN_BATCHES)

# Held-out bits/sample against context length, from the whole-clip model (docs/results.md#context-length).
results-context: venv $(DIGITS)/.complete
	$(PY) tools/context_curve.py --config=configs/spoken_digits_lm.py \
	  --workdir=$(WHOLE_AUDIO_WORKDIR) $(WHOLE_AUDIO_FLAGS) --step=950 \
	  --seq_lens=256,1024,4096,16000 --output=docs/context_curve.png

# S4D in place of S5 in the classifier, at equal parameters (docs/results.md#s4d-against-s5).
S4D_CLASSIFY_WORKDIR := workdirs/speech_commands_s4d
S4D_CLASSIFY_FLAGS := --config.model.layer=s4d --config.model.s4d_state_size=64
results-s4d-classify: venv $(DIGITS)/.complete
	$(PY) -m s5scale.train --config=configs/speech_commands.py --workdir=$(S4D_CLASSIFY_WORKDIR) \
	  $(S4D_CLASSIFY_FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(S4D_CLASSIFY_WORKDIR) \
	  --all $(S4D_CLASSIFY_FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/speech_commands.py --workdir=$(S4D_CLASSIFY_WORKDIR) \
	  --all $(S4D_CLASSIFY_FLAGS) --config.data.sample_rate=8000 --config.data.seq_len=8000 \
	  --config.eval.step_rescale=2

# text_small with each layer for COMPARE_STEPS steps (docs/results.md#s4d-against-s5).
COMPARE_STEPS ?= 1000
results-s4d-text: venv
	for layer in "s5" "s4d --config.model.s4d_state_size=256"; do \
	  dir=workdirs/text_small_$${layer%% *}_$(COMPARE_STEPS); \
	  flags="--config.model.layer=$$layer --config.train.num_steps=$(COMPARE_STEPS) \
	    --config.eval.every_steps=$(COMPARE_STEPS) --config.checkpoint.every_steps=$(COMPARE_STEPS)"; \
	  $(PY) -m s5scale.train --config=configs/text_small.py --workdir=$$dir $$flags || exit 1; \
	  $(PY) -m s5scale.evaluate --config=configs/text_small.py --workdir=$$dir --all $$flags || exit 1; \
	done

# The learning curves of the text, audio and classifier workdirs (docs/results.md).
curves: venv
	$(PY) tools/plot_metrics.py --output docs/learning_curves.png --workdirs \
	  $(WORKDIR) $(AUDIO_WORKDIR) $(CLASSIFY_WORKDIR)

# Carried state against fresh windows on long recordings of unseen voices (docs/results.md#carried-state).
LONG_DIGITS := data/long_digits
$(LONG_DIGITS)/.complete: | venv
	$(PY) tools/make_spoken_digits.py --output=$(LONG_DIGITS) --long_seconds=120
	touch $@
CARRIED_WORKDIR := workdirs/long_digits_carried
FRESH_WORKDIR := workdirs/long_digits_fresh
results-carried: venv $(LONG_DIGITS)/.complete
	$(PY) -m s5scale.train --config=configs/long_digits_lm.py --workdir=$(CARRIED_WORKDIR)
	$(PY) -m s5scale.train --config=configs/long_digits_lm.py --workdir=$(FRESH_WORKDIR) \
	  --config.data.carry_state=False
	$(PY) -m s5scale.evaluate --config=configs/long_digits_lm.py --workdir=$(CARRIED_WORKDIR) --all
	$(PY) -m s5scale.evaluate --config=configs/long_digits_lm.py --workdir=$(FRESH_WORKDIR) --all \
	  --config.data.carry_state=False
	$(PY) tools/context_curve.py --config=configs/long_digits_lm.py --workdir=$(CARRIED_WORKDIR) \
	  --seq_lens=256,2048,16000 --carried --output=docs/context_curve_carried.png
