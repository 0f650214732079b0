"""Multi-worker training (captioning.training.distributed): TF_CONFIG, connecting, data shares,
the distributed steps, train.py / train_retrieval.py under TF_CONFIG and --local-workers.

The multi-process tests (marked slow) start real worker processes on 127.0.0.1 through
run_bounded: past its timeout the whole process group is killed and the test FAILS, so a hung
collective cannot hang CI. Tolerance against one process with the same global batch: losses
rtol 1e-5, weights atol 1e-5 (the sum over two replicas is added in another order than one
batch's sum: float32 rounding, ~1e-7 after a few Adam steps of these tiny models); the workers
against each other, and a resumed run against an uninterrupted one: bit for bit.
"""
import csv
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train
from captioning.data import text
from captioning.data.features import save_features
from captioning.data.spatial import SpatialWriter
from captioning.training import distributed
from captioning.utils import PipelineError, run_cli

REPO = Path(__file__).resolve().parents[1]
WORDS = "a dog cat runs sits on the grass red ball man rides bike in water jumps over".split()
TINY = ["--embed-dim", "8", "--units", "8", "--batch-size", "8", "--verbose", "0", "--seed", "3",
        "--connect-timeout", "60", "--recipe", "tutorial"]
GRID = ["--annotation-dim", "8", "--attention-dim", "8", "--penalty", "1.0"]
LIMIT = 300          # seconds for one multi-process command on 2 shared cores (they take ~40-60)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
ENV.pop("TF_CONFIG", None)


# ---- fixtures -----------------------------------------------------------------------------------
def make_data(root, n_images=(10, 3, 2), dim=6, grid=(2, 2), seed=0):
    """Flickr8k-format captions (5 random ones per image) prepared by captioning.data.text into
    root/data, random pooled features root/features.pkl (dim,) and grids root/grids.h5."""
    rng = np.random.default_rng(seed)
    text_dir = root / "Flickr8k_text"
    text_dir.mkdir(parents=True)
    splits, lines, ids = {}, [], []
    for split, count in zip(("train", "dev", "test"), n_images):
        splits[split] = [f"{split}{k:02d}" for k in range(count)]
        ids += splits[split]
    for image_id in ids:
        lines += [f"{image_id}.jpg#{c}\t{' '.join(rng.choice(WORDS, rng.integers(2, 9)))}" for c in range(5)]
    (text_dir / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, name in text.SPLIT_FILES.items():
        (text_dir / name).write_text("".join(f"{i}.jpg\n" for i in splits[split]))
    outputs, _ = text.prepare(text_dir)
    text.write_outputs(root / "data", outputs)
    save_features(root / "features.pkl", {i: rng.normal(size=dim).astype(np.float32) for i in ids})
    writer = SpatialWriter(root / "grids.h5", "test", "lite0", "head_relu")
    writer.append({i: rng.normal(size=(*grid, 8)).astype(np.float32) for i in ids})
    writer.finish()
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("distributed"))


def train_args(root, name, *extra, features="features.pkl"):
    return ["--features", str(root / features), "--data-dir", str(root / "data"),
            "--output-dir", str(root / "models"), "--name", name, *TINY, *extra]


def run_bounded(command, timeout=LIMIT, env=None):
    """(status, stdout, stderr, seconds) of `command` in a process group of its own; past
    `timeout` the whole group (a launcher and its workers) is killed and the test fails."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or ENV, cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, command[:4]))} ... did not finish within {timeout} s "
                    f"(a hung collective?); stderr tail: {err[-2000:]}")
    return proc.returncode, out, err, time.monotonic() - started


def script(name, *args):
    return [sys.executable, str(REPO / name), *map(str, args)]


def history(run_dir):
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def last_weights(run_dir):
    from captioning.models import registry
    return registry.load_keras(Path(run_dir) / "current" / "last.keras", compile=False).get_weights()


def errors(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


# ---- TF_CONFIG ----------------------------------------------------------------------------------
def test_tf_config_ranks_the_chief_first():
    cluster = distributed.parse_tf_config(distributed.tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))
    assert cluster.size == 2 and cluster.rank == 1 and not cluster.is_chief
    assert cluster.peer(0) == "worker 0 (127.0.0.1:1)"
    with_chief = distributed.parse_tf_config(json.dumps({
        "cluster": {"worker": ["b:2", "c:3"], "chief": ["a:1"]}, "task": {"type": "worker", "index": 1}}))
    assert with_chief.addresses == ("a:1", "b:2", "c:3") and with_chief.rank == 2
    assert with_chief.name == "worker 1" and json.loads(with_chief.tf_config())["task"] == {
        "type": "worker", "index": 1}
    assert distributed.cluster_from_env({}) is None and distributed.cluster_from_env({"TF_CONFIG": " "}) is None


@pytest.mark.parametrize("text, message", [
    ('{"cluster": {"worker": ["a:1"]', "not valid JSON"),
    ('[1, 2]', 'no "cluster"'),
    ('{"cluster": {"worker": ["a:1"]}}', 'no "task"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     "task index 2 is out of range: job 'worker' has 2 addresses"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief'"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "job 'ps'"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "'a' is not host:port"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "a:1 twice"),
])
def test_malformed_tf_config_is_a_one_line_error(text, message, monkeypatch, capsys):
    with pytest.raises(PipelineError, match=message):
        distributed.parse_tf_config(text)
    # through train.py: the error comes before any data is read or peer waited for
    monkeypatch.setenv("TF_CONFIG", text)
    assert run_cli(train.main, ["--features", "missing.pkl"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: TF_CONFIG") and message.split()[0] in err


def test_cv_and_local_workers_are_refused_under_a_several_worker_tf_config(monkeypatch, capsys):
    monkeypatch.setenv("TF_CONFIG", distributed.tf_config(["127.0.0.1:1", "127.0.0.1:2"], 0))
    assert run_cli(train.main, ["--cv", "3"]) == 1
    assert "--cv trains its folds in one process: unset TF_CONFIG" in capsys.readouterr().err
    assert run_cli(train.main, ["--local-workers", "2"]) == 1
    assert "--local-workers makes each worker's TF_CONFIG" in capsys.readouterr().err


# ---- connecting ---------------------------------------------------------------------------------
def test_wait_for_peers_names_the_silent_peer_within_the_timeout():
    own, silent = distributed.free_ports(2)
    cluster = distributed.parse_tf_config(distributed.tf_config([f"127.0.0.1:{own}", f"127.0.0.1:{silent}"], 0))
    started = time.monotonic()
    with pytest.raises(PipelineError, match=rf"worker 1 \(127.0.0.1:{silent}\) did not answer within 2 s"):
        distributed.wait_for_peers(cluster, 2.0)
    assert time.monotonic() - started < 4.0
    # a peer that listens is found at once, and this task's port is free again afterwards
    import socket
    with socket.create_server(("127.0.0.1", silent)):
        started = time.monotonic()
        distributed.wait_for_peers(cluster, 10.0)
        assert time.monotonic() - started < 2.0
    socket.create_server(("127.0.0.1", own)).close()


def test_deadline_kills_a_block_that_hangs_with_one_line():
    code = ("import time; from captioning.training.distributed import deadline\n"
            "with deadline(1.0, 'stuck in the strategy'):\n    time.sleep(60)")
    status, _, err, seconds = run_bounded([sys.executable, "-c", code], timeout=30)
    assert status == -signal.SIGKILL and err == "error: stuck in the strategy\n" and seconds < 15
    status, _, err, _ = run_bounded([sys.executable, "-c", code.replace("time.sleep(60)", "pass")], timeout=30)
    assert status == 0 and err == ""


# ---- the local launcher -------------------------------------------------------------------------
WORKER = """
import json, os, sys, time
rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
print("rank", rank, "args", *sys.argv[1:], flush=True)
if rank == 1 and "fail" in sys.argv:
    print("error: worker one failed", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(float(sys.argv[1]))
"""


def test_launcher_prefixes_output_and_stops_everyone_when_one_fails(tmp_path, capfd):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    assert distributed.launch_local(2, ["0"], worker, timeout=60) == 0
    out, _ = capfd.readouterr()
    assert "[worker 0] rank 0 args 0" in out and "[worker 1] rank 1 args 0" in out
    started = time.monotonic()
    assert distributed.launch_local(2, ["60", "fail"], worker, timeout=60) == 3
    assert time.monotonic() - started < 20            # worker 0 was killed, not waited for
    _, err = capfd.readouterr()
    assert "[worker 1] error: worker one failed" in err
    assert "error: worker 1 exited with status 3; stopped the other workers" in err
    started = time.monotonic()
    assert distributed.launch_local(2, ["60"], worker, timeout=3) == 124
    assert time.monotonic() - started < 20
    assert "did not finish within 3 s" in capfd.readouterr().err


def test_without_option_drops_the_launchers_own_option():
    assert distributed.without_option(["--a", "1", "--local-workers", "2", "--b"], "--local-workers") == [
        "--a", "1", "--b"]
    assert distributed.without_option(["--local-workers=2", "x"], "--local-workers") == ["x"]


# ---- data shares --------------------------------------------------------------------------------
def test_shares_cover_every_caption_once_and_pad_empty_replicas():
    index = np.array([7, 3, 9, 1, 4])
    shares = [distributed.replica_share(index, r, 3) for r in range(3)]
    assert [s[0].tolist() for s in shares] == [[7, 1], [3, 4], [9]] and {s[1] for s in shares} == {1.0}
    lonely = [distributed.replica_share(np.array([5]), r, 2) for r in range(2)]
    assert [(s[0].tolist(), s[1]) for s in lonely] == [([5], 1.0), ([5], 0.0)]   # padded, weight 0
    # grid variants: whole images, dealt out in turn
    image_rows = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    index = np.arange(8)
    parts = [distributed.replica_share(index, r, 2, image_rows) for r in range(2)]
    assert [p[0].tolist() for p in parts] == [[0, 1, 5], [2, 3, 4, 6, 7]]
    one_image = [distributed.replica_share(np.array([2, 3, 4]), r, 2, image_rows) for r in range(2)]
    assert [(p[0].tolist(), p[1]) for p in one_image] == [([2, 3, 4], 1.0), ([2, 3, 4], 0.0)]


TWO_REPLICAS = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from captioning.data import inputs
from captioning.models import registry
from captioning.retrieval import vse
from captioning.training import distributed
rng = np.random.default_rng(0)
features = rng.normal(size=(6, 5)).astype(np.float32)
examples = [(i % 6, np.array([1, *rng.integers(3, 20, rng.integers(1, 7)), 2], np.int32)) for i in range(23)]
plan = inputs.plan_batches([len(ids) for _, ids in examples], 8, np.random.default_rng(1))
workers = distributed.Workers(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                              distributed.Cluster(("127.0.0.1:1",), 0, ("worker 0",)))
def pair(index):
    rows = np.array([examples[i][0] for i in index], np.int32)
    return {"image_input": features[rows], "caption_input": vse.pad_batch([examples[i][1] for i in index])}, rows
def both(build, make_batch, signature, steps_class, **extra):
    keras.utils.set_random_seed(2)
    model = distributed.build_in_scope(workers, build)
    alone = build()
    alone.set_weights(model.get_weights())
    steps = steps_class(workers, model, **extra)
    losses = [steps.train_epoch(distributed.distribute(workers, [index], make_batch, signature)) for index in plan]
    single = [float(alone.train_on_batch(*make_batch(index))) for index in plan]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), alone.get_weights()))
    return np.max(np.abs(np.array(losses) - single) / np.array(single)), diff
config = {"variant": "merge", "feature_dim": 5, "vocab_size": 20, "max_length": 10, "embed_dim": 8, "units": 8, "dropout": 0.0}
make_batch, signature, _ = distributed.caption_batches(config, examples, features)
print("caption", *both(lambda: registry.compile_model(registry.build_from_config(config), 0.01, 0.1, 3.0),
                       make_batch, signature, distributed.CaptionSteps))
def vse_model():
    model = vse.build_model(5, 20, 8, 6)
    model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=0.5), loss=vse.embedding_loss_class()(0.2))
    return model
sig = ({"image_input": tf.TensorSpec((None, 5), tf.float32), "caption_input": tf.TensorSpec((None, None), tf.int32)},
       tf.TensorSpec((None,), tf.int32))
holder = {}
def build_vse():
    model = vse_model()
    holder.setdefault("model", model)       # the first one built: the distributed model
    return model
print("contrastive", *both(build_vse, pair, sig, distributed.ContrastiveSteps,
                           loss_fn=lambda joint, rows: keras.ops.mean(holder["model"].loss.call(rows, joint))))
"""


@pytest.mark.slow
def test_two_replicas_of_one_worker_take_the_steps_of_one_process(tmp_path):
    """Two local replicas (two logical CPUs, as a worker with two GPUs would have): the caption
    step with label smoothing and the contrastive step with clipnorm (summed, then clipped) take
    the same steps as Keras' train_on_batch on the whole batch."""
    status, out, err, _ = run_bounded([sys.executable, "-c", TWO_REPLICAS], timeout=LIMIT)
    assert status == 0, err[-3000:]
    results = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()}
    for kind in ("caption", "contrastive"):
        loss_rel, weight_diff = results[kind]
        assert loss_rel < 1e-5 and weight_diff < 1e-5, (kind, loss_rel, weight_diff)


# ---- several worker processes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_runs(data_root):
    """The same merge run (dropout 0: one process draws other dropout masks than two replicas)
    by two workers (train.py --local-workers 2) and by one process."""
    args = train_args(data_root, "two", "--epochs", "2", "--dropout", "0")
    status, out, err, _ = run_bounded(script("train.py", *args, "--local-workers", "2"))
    assert status == 0, err[-3000:]
    status, _, err, _ = run_bounded(script("train.py", *train_args(data_root, "one", "--epochs", "2",
                                                                     "--dropout", "0")))
    assert status == 0, err[-3000:]
    return data_root / "models", out


@pytest.mark.slow
def test_two_workers_end_in_step_and_match_one_process(merge_runs):
    from captioning.models import registry
    models, out = merge_runs
    digests = {line.split("] ")[0]: line.rsplit(" ", 1)[-1] for line in out.splitlines()
               if "in step with 1 other worker" in line}
    assert set(digests) == {"[worker 0", "[worker 1"} and len(set(digests.values())) == 1
    two, one = history(models / "two"), history(models / "one")
    assert [r["epoch"] for r in two] == ["1", "2"]
    for a, b in zip(two, one):
        for key in ("loss", "val_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    # the chief's checkpoint holds the weights both workers ended with
    model = registry.load_keras(models / "two" / "current" / "last.keras", compile=False)
    assert distributed.weights_digest(model) == digests["[worker 0"]
    for a, b in zip(model.get_weights(), last_weights(models / "one")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the run folder is the one-process kind: evaluate_bleu.py reads it
    assert sorted(p.name for p in (models / "two").iterdir()) == sorted(p.name for p in (models / "one").iterdir())
    assert json.loads((models / "two" / "settings.json").read_text())["workers"] == 2
    assert "[worker 0] best dev loss" in out and "[worker 1] best" not in out


@pytest.mark.slow
def test_two_workers_train_a_grid_model_as_one_process(data_root):
    args = ["--variant", "attention", *GRID, "--epochs", "1", "--dropout", "0"]
    status, _, err, _ = run_bounded(script("train.py", *train_args(data_root, "att2", *args, features="grids.h5"),
                                           "--local-workers", "2"))
    assert status == 0, err[-3000:]
    status, _, err, _ = run_bounded(script("train.py", *train_args(data_root, "att1", *args, features="grids.h5")))
    assert status == 0, err[-3000:]
    (two,), (one,) = history(data_root / "models" / "att2"), history(data_root / "models" / "att1")
    for key in ("loss", "val_loss"):            # loss: cross-entropy + attention penalty
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5), key


@pytest.mark.slow
def test_a_killed_worker_restarted_resumes_to_the_uninterrupted_result(data_root):
    """Dropout on: the resumed run must also continue the dropout RNG where it stopped."""
    # batches of 4: epoch 2 takes a dozen steps, so the kill lands inside it
    args = script("train.py", *train_args(data_root, "whole", "--epochs", "2", "--batch-size", "4"),
                  "--local-workers", "2")
    status, _, err, _ = run_bounded(args)
    assert status == 0, err[-3000:]
    killed = [a if a != "whole" else "killed" for a in args]
    proc = subprocess.Popen(killed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO, start_new_session=True)
    try:
        pids, deadline, line = None, time.monotonic() + LIMIT, ""
        while not line.startswith("[worker 0] epoch 1:"):
            assert time.monotonic() < deadline and proc.poll() is None, "no first epoch"
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
                if line.startswith("started 2 workers"):
                    pids = [int(p) for p in line.split("(pids ")[1].rstrip(")\n").split()]
        os.kill(pids[1], signal.SIGKILL)              # worker 1, after the chief kept epoch 1
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "worker 1 exited with status -9" in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status, out, err, _ = run_bounded(killed)
    assert status == 0, err[-3000:]
    assert "resuming" in out and "after epoch 1 on 2 workers" in out and "[worker 0] epoch 2:" in out
    assert "[worker 0] epoch 1:" not in out
    for a, b in zip(last_weights(data_root / "models" / "killed"), last_weights(data_root / "models" / "whole")):
        np.testing.assert_array_equal(a, b)
    assert history(data_root / "models" / "killed")[1]["loss"] == history(data_root / "models" / "whole")[1]["loss"]


def start_workers(data_root, name, extras):
    """Workers of train.py started by hand, as on separate machines (no launcher to stop them)."""
    addresses = [f"127.0.0.1:{p}" for p in distributed.free_ports(len(extras))]
    return addresses, [subprocess.Popen(script("train.py", *train_args(data_root, name), *extra),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**ENV, "TF_CONFIG": distributed.tf_config(addresses, rank)},
                                        cwd=REPO, start_new_session=True)
                       for rank, extra in enumerate(extras)]


def finish(procs, timeout=LIMIT):
    """[(stdout, stderr)] of every process; all killed (and the test failed) past `timeout`."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers did not finish within {timeout} s (a hung collective?)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_lost_peer_stops_the_survivor_with_one_line(data_root):
    """Without a launcher: the chief finds worker 1 gone in its next collective."""
    addresses, procs = start_workers(data_root, "lost", [["--epochs", "50", "--batch-size", "2"]] * 2)
    deadline = time.monotonic() + LIMIT
    while "epoch 1:" not in procs[0].stdout.readline():
        assert time.monotonic() < deadline and procs[0].poll() is None, "no first epoch"
    procs[1].kill()
    started = time.monotonic()
    (_, err), _ = finish(procs, timeout=60)
    assert procs[0].returncode == 1 and time.monotonic() - started < 60
    assert errors(err)[-1].startswith(f"error: worker 0 lost worker 1 ({addresses[1]}) (")
    assert err.rstrip("\n").splitlines()[-1] == errors(err)[-1]     # TensorFlow's own log lines come before


@pytest.mark.slow
def test_an_unreachable_worker_is_a_one_line_error_within_the_timeout(data_root):
    own, silent = distributed.free_ports(2)
    env = {**ENV, "TF_CONFIG": distributed.tf_config([f"127.0.0.1:{own}", f"127.0.0.1:{silent}"], 0)}
    status, _, err, seconds = run_bounded(script("train.py", *train_args(data_root, "lonely"),
                                                 "--connect-timeout", "5"), timeout=120, env=env)
    assert status == 1
    assert errors(err) == [f"error: worker 1 (127.0.0.1:{silent}) did not answer within 5 s: start "
                           f"every task of TF_CONFIG's cluster, check its address and that the port is open"]
    assert seconds < 5 + 30            # the timeout plus starting Python and reading the options


@pytest.mark.slow
def test_a_worker_with_other_settings_is_refused_naming_the_setting(data_root):
    addresses, procs = start_workers(data_root, "mixed", [[], ["--learning-rate", "0.002"]])
    results = finish(procs)
    expected = (f"error: worker 1 ({addresses[1]}) was started with learning_rate 0.002, the chief "
                f"with 0.001: start every worker with the same settings")
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 1 and errors(err) == [expected]
    assert not (data_root / "models" / "mixed" / "current").exists()


@pytest.mark.slow
def test_two_workers_train_the_retrieval_model_as_one_process(data_root):
    """Warm-up (summed negatives) in every epoch: the hardest negative is a max, so a
    rounding-level difference may pick another negative and the two runs part ways; Keras' own
    fit and train_on_batch part the same way on these batches."""
    common = ["--features", data_root / "features.pkl", "--data-dir", data_root / "data",
              "--output-dir", data_root / "models", "--embed-dim", "8", "--word-dim", "5",
              "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "2", "--verbose", "0",
              "--backbone", "lite0"]
    status, out, err, _ = run_bounded(script("train_retrieval.py", *common, "--name", "vse2", "--local-workers", "2"))
    assert status == 0, err[-3000:]
    status, _, err, _ = run_bounded(script("train_retrieval.py", *common, "--name", "vse1"))
    assert status == 0, err[-3000:]
    two, one = history(data_root / "models" / "vse2"), history(data_root / "models" / "vse1")
    for a, b in zip(two, one):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert a["dev_rsum"] == b["dev_rsum"]
    for a, b in zip(last_weights(data_root / "models" / "vse2"), last_weights(data_root / "models" / "vse1")):
        np.testing.assert_allclose(a, b, atol=1e-5)
