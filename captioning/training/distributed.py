"""Training on several machines: tf.distribute.MultiWorkerMirroredStrategy configured by TF_CONFIG.

Owns
  TF_CONFIG      parse_tf_config / cluster_from_env: the cluster's addresses, this process's
                 rank, which one is the chief. Malformed JSON, a missing "cluster" or "task", a
                 job the strategy does not use, a task index out of range: one-line PipelineError.
  connect        a pre-flight TCP check of every peer, then the strategy, then one collective,
                 all within `timeout` seconds (CONNECT_TIMEOUT): an unreachable worker is a
                 one-line error naming its address, not a hang.
  Workers        the connected strategy: gather_json / on_chief (the chief's answer, or its
                 error, reaches every worker), broadcast_variables, check_settings (a worker
                 started with other settings than the chief's is refused, naming the setting).
  data shares    caption_plan draws the global batches of an epoch exactly as one process
                 does; replica_share deals each batch out; distribute() builds each worker's
                 tf.data pipeline of its own shares only.
  steps          CaptionSteps (merge, inject, attention, transformer: the compiled caption loss
                 plus the attention penalty) and ContrastiveSteps (a loss over the whole global
                 batch, e.g. VSE++'s in-batch negatives); gradients summed over the replicas,
                 one Keras optimizer step.
  train_run      the caption trainer's run (captioning.training.trainer) under the strategy:
                 only the chief reads and writes the run folder (captioning.training.run_folder).
  launch_local   n workers of a script (train.py) on 127.0.0.1: free ports, TF_CONFIG each,
                 output prefixed per worker, all stopped when one fails, a hard timeout.
train_retrieval.py's run on several workers is captioning.retrieval.training.train_run_workers
(Workers, distribute and ContrastiveSteps from here). docs/distributed.md: launching, Slurm.

Why a custom step on public API (strategy.run, GradientTape, distribute_datasets_from_function,
ReplicaContext.all_reduce/all_gather) and not model.fit: Keras 3's fit fails under this strategy
(a PerReplica error while building, then a reduction of scalar losses along axis 0), and a
patch of Keras' trainer would pin one Keras version's private code; the loop here uses only
documented calls and the model's own compiled loss and optimizer.

The global batch. --batch-size is the GLOBAL batch: captions per optimizer step over all
workers. Every worker draws the same global batches as one process would (same seed, same
length buckets), replica r of N takes its share (captions r, r+N, ...; grid variants: whole
images dealt the same way), and each replica's loss is weighted by its share of the global
batch's rows (the attention penalty by its share of the words), so the summed gradient is the
one-process gradient of that batch. The learning rate is therefore the one given, unchanged:
N workers at --batch-size B take exactly the steps of one process at B. To go faster with more
workers, raise --batch-size and scale --learning-rate yourself (linearly, or by the square root
for Adam); nothing is rescaled behind the user's back.
The remainder: a global batch with fewer captions (images) than replicas leaves some replicas
without a share; those are PADDED with a copy of the batch's first caption (image) at weight 0,
so every worker runs exactly the same number of steps, no caption is dropped, and the
result equals one process's.

Reads and writes nothing itself; train_run writes the run folder through RunFolder on the chief.
TensorFlow and Keras are imported inside functions (heavy).
"""
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.data import grid_inputs, inputs
from captioning.models import registry
from captioning.utils import PipelineError, read_json

CONNECT_TIMEOUT = 60.0     # seconds for every peer to answer, the strategy to start, one collective
PROBE_INTERVAL = 0.25      # seconds between TCP attempts at a peer not yet listening
JOBS = ("chief", "worker")  # TF_CONFIG jobs this strategy trains with (no ps, no evaluator)


# ---- TF_CONFIG ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """TF_CONFIG, checked. addresses: "host:port" of every task in rank order (the chief first:
    the "chief" job when there is one, else worker 0); rank: this process's place in them."""
    addresses: tuple
    rank: int
    names: tuple          # "chief 0", "worker 1", ... per rank, as TF_CONFIG calls them

    @property
    def size(self):
        return len(self.addresses)

    @property
    def is_chief(self):
        return self.rank == 0

    @property
    def name(self):
        return self.names[self.rank]

    def tf_config(self):
        """TF_CONFIG's JSON text of this task."""
        jobs = {}
        for name, address in zip(self.names, self.addresses):
            jobs.setdefault(name.split()[0], []).append(address)
        kind, index = self.name.split()
        return json.dumps({"cluster": jobs, "task": {"type": kind, "index": int(index)}})

    def peer(self, rank):
        """'worker 1 (127.0.0.1:23456)'."""
        return f"{self.names[rank]} ({self.addresses[rank]})"


def _split_address(address, where=""):
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PipelineError(f"TF_CONFIG address {address!r} is not host:port{where}")
    return host.strip("[]"), int(port)


def parse_tf_config(text, where=None):
    """TF_CONFIG's JSON text -> Cluster; a one-line PipelineError for anything malformed.

    Shape: {"cluster": {"chief": ["host:port"], "worker": ["host:port", ...]},
            "task": {"type": "worker", "index": 0}}  ("chief" is optional). where: said after
    the message in parentheses (e.g. a file it came from).
    """
    where = f" ({where})" if where else ""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"TF_CONFIG is not valid JSON: {exc.msg} at character {exc.pos}{where}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or not config["cluster"]:
        raise PipelineError(f'TF_CONFIG has no "cluster" object of jobs and addresses{where}')
    if not isinstance(config.get("task"), dict):
        raise PipelineError(f'TF_CONFIG has no "task" object ({{"type": "worker", "index": N}}){where}')
    cluster, task = config["cluster"], config["task"]
    other = [job for job in cluster if job not in JOBS]
    if other:
        raise PipelineError(f"TF_CONFIG job {other[0]!r} is not used: MultiWorkerMirroredStrategy "
                            f"trains with {' and '.join(JOBS)} tasks only{where}")
    addresses, names = [], []
    for job in JOBS:
        tasks = cluster.get(job, [])
        if not isinstance(tasks, list) or not tasks and job in cluster:
            raise PipelineError(f"TF_CONFIG cluster job {job!r} must be a non-empty list of host:port{where}")
        if job == "chief" and len(tasks) > 1:
            raise PipelineError(f"TF_CONFIG names {len(tasks)} chiefs; there is one{where}")
        for index, address in enumerate(tasks):
            _split_address(address, where)
            addresses.append(str(address))
            names.append(f"{job} {index}")
    duplicate = next((a for a in addresses if addresses.count(a) > 1), None)
    if duplicate:
        raise PipelineError(f"TF_CONFIG names {duplicate} twice{where}")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise PipelineError(f"TF_CONFIG task type {kind!r} is not a job of its cluster "
                            f"({', '.join(cluster)}){where}")
    count = len(cluster[kind])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise PipelineError(f"TF_CONFIG task index {index!r} is out of range: job {kind!r} has "
                            f"{count} address{'es' if count != 1 else ''} (0..{count - 1}){where}")
    return Cluster(tuple(addresses), names.index(f"{kind} {index}"), tuple(names))


def cluster_from_env(environ=None):
    """The Cluster of $TF_CONFIG, or None where it is unset or blank (one process)."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    return parse_tf_config(text) if text.strip() else None


def add_options(parser):
    """The command-line options of a trainer that can run on several workers."""
    parser.add_argument("--local-workers", type=int, default=0, metavar="N",
                        help="start N workers of this command on 127.0.0.1 (each gets a TF_CONFIG; "
                             "for trying and testing multi-worker training on one machine)")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                        help="under a TF_CONFIG naming several workers: how long to wait for them")


def join(timeout=CONNECT_TIMEOUT, one_process=None):
    """The connected Workers when $TF_CONFIG names several tasks, else None (train in one process).

    one_process: why this run cannot be distributed (e.g. "--cv trains its folds in one
    process"); with several tasks in TF_CONFIG that is a one-line error, before any waiting.
    """
    cluster = cluster_from_env()
    if cluster is None or cluster.size < 2:
        return None
    if one_process:
        raise PipelineError(f"{one_process}: unset TF_CONFIG (it names {cluster.size} workers)")
    return connect(cluster, timeout)


def tf_config(addresses, rank):
    """TF_CONFIG text for task `rank` of a cluster of workers (launch_local, the docs' examples)."""
    return json.dumps({"cluster": {"worker": list(addresses)},
                       "task": {"type": "worker", "index": rank}})


# ---- connecting -----------------------------------------------------------------------------------
def wait_for_peers(cluster, timeout):
    """Return once every other task of `cluster` accepts a TCP connection; PipelineError naming
    the silent ones after `timeout` seconds.

    Meanwhile this task listens on its own TF_CONFIG port, so peers still in this check reach
    it too; the socket is closed before TensorFlow's server takes the port. Why: the strategy
    blocks in C++ while a peer is missing, holding the GIL and ignoring SIGTERM, so it cannot
    be timed out from Python; this check is the part that can.
    """
    _, port = _split_address(cluster.addresses[cluster.rank])
    try:
        listener = socket.create_server(("", port), reuse_port=hasattr(socket, "SO_REUSEPORT"))
    except OSError as exc:
        raise PipelineError(f"cannot listen on port {port} of {cluster.peer(cluster.rank)} "
                            f"(TF_CONFIG): {exc.strerror or exc}") from None
    listener.settimeout(PROBE_INTERVAL)
    stop = threading.Event()

    def answer():
        # peers connect and close at once; waiting for their close leaves TIME_WAIT on their
        # side, not on this port, which TensorFlow binds next
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    conn.recv(1)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    pending = [r for r in range(cluster.size) if r != cluster.rank]
    deadline = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < deadline:
            for rank in list(pending):
                try:
                    with socket.create_connection(_split_address(cluster.addresses[rank]),
                                                  timeout=min(1.0, timeout)):
                        pending.remove(rank)
                except OSError:
                    pass
            if pending:
                time.sleep(PROBE_INTERVAL)
    finally:
        stop.set()
        thread.join()
        listener.close()
    if pending:
        raise PipelineError(f"{', '.join(cluster.peer(r) for r in pending)} did not answer within "
                            f"{timeout:g} s: start every task of TF_CONFIG's cluster, check its "
                            f"address and that the port is open")


WATCHDOG = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], seconds)[0]:
    print("error: " + message, file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def deadline(seconds, message):
    """Kill this process with `message` as its one error line if the block takes longer.

    A separate small process keeps the time: a call blocked in TensorFlow's C++ holds the GIL,
    so no Python thread or signal handler of this process would run. Leaving the block (or
    this process dying) closes the watchdog's stdin, which ends it.
    """
    watchdog = subprocess.Popen([sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()), str(seconds),
                                 message], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watchdog.stdin.close()
        watchdog.wait()


def connect(cluster, timeout=CONNECT_TIMEOUT):
    """Workers: every peer reachable, MultiWorkerMirroredStrategy started, one collective done,
    within `timeout` seconds each part; else a one-line error (PipelineError from the pre-flight
    check, or the watchdog's line and exit status 137 if the strategy itself hangs).

    Call it before any other TensorFlow work in the process (the strategy must configure the
    runtime first) and before loading data, so peers that load at different speeds still meet.
    """
    os.environ["TF_CONFIG"] = cluster.tf_config()     # what the strategy reads
    wait_for_peers(cluster, timeout)
    with deadline(timeout, f"{cluster.name}: the workers of TF_CONFIG did not start "
                           f"MultiWorkerMirroredStrategy together within {timeout:g} s (does every "
                           f"worker have the same cluster in TF_CONFIG?)"):
        import tensorflow as tf
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        workers = Workers(strategy, cluster)
        workers.gather_json(cluster.name)       # one collective: the wires work
    return workers


# ---- the connected workers ------------------------------------------------------------------------
class Workers:
    """The strategy of a connected cluster and the few collectives training needs besides the
    gradient sum. gather_json, on_chief, broadcast_variables, check_settings and check_in_step
    are collectives: every worker calls them, in the same order."""

    def __init__(self, strategy, cluster):
        self.strategy, self.cluster = strategy, cluster
        self.digest = None      # weights_digest after the last check_in_step

    @property
    def is_chief(self):
        return self.cluster.is_chief

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync

    def _run(self, fn, *args):
        """fn in every local replica; the first local replica's result as numpy."""
        result = self.strategy.run(fn, args=args)
        return np.asarray(self.strategy.experimental_local_results(result)[0])

    def gather_json(self, obj):
        """[each worker's `obj`] in rank order (JSON-serialisable values)."""
        import tensorflow as tf
        data = np.frombuffer(json.dumps([self.cluster.rank, obj]).encode("utf-8"), np.uint8)
        gather = lambda x: tf.distribute.get_replica_context().all_gather(x, axis=0)  # noqa: E731
        lengths = self._run(gather, tf.constant([len(data)], tf.int32))
        padded = np.zeros(int(lengths.max()), np.int32)
        padded[:len(data)] = data
        rows = self._run(gather, tf.constant(padded[None]))
        found = {}
        for row, length in zip(rows, lengths):    # one row per replica; a worker's replicas agree
            rank, value = json.loads(bytes(row[:length].astype(np.uint8)).decode("utf-8"))
            found[rank] = value
        return [found[rank] for rank in sorted(found)]

    def on_chief(self, fn):
        """fn() on the chief; its JSON result, or its error, on every worker.

        The chief alone reads and writes the run folder; the others wait here for its answer.
        A PipelineError there stops every worker with the same line instead of leaving them
        waiting in the next collective.
        """
        answer = None
        if self.is_chief:
            try:
                answer = {"ok": fn()}
            except PipelineError as exc:
                answer = {"error": str(exc)}
        answer = self.gather_json(answer)[0]
        if "error" in answer:
            raise PipelineError(answer["error"] if self.is_chief else f"the chief stopped: {answer['error']}")
        return answer["ok"]

    def broadcast_variables(self, variables):
        """Give every worker the chief's values of `variables` (model and optimizer state).

        A sum in which the others add zeros: exact, and one collective for all of them. The
        chief may have read them from a checkpoint the others have no copy of.
        """
        import tensorflow as tf
        values = [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in variables]
        send = [tf.constant(x if self.is_chief else np.zeros_like(x), dtype=_wire_dtype(x.dtype))
                for x in values]
        result = self.strategy.run(
            lambda *xs: tf.distribute.get_replica_context().all_reduce("sum", list(xs)), args=tuple(send))
        for variable, value, got in zip(variables, values, self.strategy.experimental_local_results(result)[0]):
            variable.assign(np.asarray(got).astype(value.dtype))

    def check_settings(self, settings):
        """Refuse to train unless every worker has the chief's `settings` ({name: JSON value}).

        A one-line PipelineError on every worker naming the first setting that differs, the
        worker and both values. Paths may differ between machines; put the file's checksum
        in `settings`, not its path.
        """
        ours = json.loads(json.dumps(settings, sort_keys=True))
        everyone = self.gather_json(ours)
        chief = everyone[0]
        for rank, theirs in enumerate(everyone[1:], start=1):
            for key in sorted(set(chief) | set(theirs)):
                if chief.get(key) != theirs.get(key):
                    raise PipelineError(
                        f"{self.cluster.peer(rank)} was started with {key} {theirs.get(key)!r}, the "
                        f"chief with {chief.get(key)!r}: start every worker with the same settings")

    def check_in_step(self, model, when):
        """Refuse to go on unless every worker holds the chief's weights; returns their digest.

        The replicas apply the same summed gradient to the same values, so they stay equal bit
        for bit; a difference means nondeterminism or a bug, and is an error, not a warning.
        """
        digest = weights_digest(model)
        for rank, theirs in enumerate(self.gather_json(digest)):
            if theirs != digest:
                raise PipelineError(f"the weights of {self.cluster.peer(rank)} differ from "
                                    f"{self.cluster.name}'s {when}: the workers are not in step")
        self.digest = digest
        return digest

    def report(self, first_epoch, last_epoch):
        """Every worker's closing line: the epochs it trained (first_epoch finished before,
        last_epoch after) and the weights digest all of them share."""
        others = self.cluster.size - 1
        print(f"{self.cluster.name}: trained epochs {first_epoch + 1}..{last_epoch} in step with "
              f"{others} other worker{'s' if others > 1 else ''}, weights {self.digest}", flush=True)

    @contextlib.contextmanager
    def peers_watched(self):
        """Turn a peer lost in a collective (killed, crashed, network gone: TensorFlow raises
        within seconds) into a one-line PipelineError naming it."""
        import tensorflow as tf
        try:
            yield
        except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                tf.errors.DeadlineExceededError) as exc:
            # the first task the message names other than this one: the peer that went away
            named = [f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", str(exc))]
            peer = next((n for n in named if n != self.cluster.name and n in self.cluster.names), None)
            peer = self.cluster.peer(self.cluster.names.index(peer)) if peer else "a peer"
            raise PipelineError(f"{self.cluster.name} lost {peer} ({type(exc).__name__}): a worker "
                                f"stopped or the network failed; start every worker again with the "
                                f"same command to resume after the last finished epoch") from None


def weights_digest(model):
    """sha256 (16 hex digits) of a model's weights, in order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def _wire_dtype(dtype):
    """Collectives sum floats; integer state (seeds, step counters < 2**53) travels as float64."""
    return dtype if np.issubdtype(dtype, np.floating) else np.float64


# ---- each worker's share of the data ------------------------------------------------------------
def caption_plan(config, examples, batch_size, seed=None, epoch=0):
    """The global batches of one epoch, [example index arrays], as one process draws them
    (captioning.data.inputs / grid_inputs, rng (seed, epoch); seed None: evaluation order)."""
    rng = None if seed is None else np.random.default_rng([seed, epoch])
    if config["variant"] in registry.GRID_VARIANTS:
        return grid_inputs.plan_image_batches(examples, batch_size, rng)
    return inputs.plan_batches([len(ids) for _, ids in examples], batch_size, rng)


def replica_share(index, replica, replicas, image_rows=None):
    """(example indices, weight) of replica `replica` of `replicas` in one global batch.

    index: the global batch's example indices; image_rows: (n_examples,) image row of every
    example when whole images must stay together (grid variants), else None. Captions (or
    images) are dealt out in turn; a replica left without any gets the batch's first caption
    (image) at weight 0: it runs the step like the others and adds nothing to it.
    """
    index = np.asarray(index)
    if image_rows is None:
        part = index[replica::replicas]
        return (part, 1.0) if len(part) else (index[:1], 0.0)
    rows = np.asarray(image_rows)[index]
    images = list(dict.fromkeys(rows.tolist()))        # the batch's images, in order
    part = index[np.isin(rows, images[replica::replicas])]
    return (part, 1.0) if len(part) else (index[rows == images[0]], 0.0)


def caption_batches(config, examples, matrix):
    """(make_batch(index) -> (x, y), tf.data signature of (x, y), image rows or None)."""
    import tensorflow as tf
    if config["variant"] in registry.GRID_VARIANTS:
        rows = np.array([row for row, _ in examples])
        signature = ({"image_input": tf.TensorSpec((None,) + tuple(matrix.shape[1:]), tf.float32),
                      "caption_input": tf.TensorSpec((None, None), tf.int32),
                      "image_index": tf.TensorSpec((None,), tf.int32)},
                     tf.TensorSpec((None, None), tf.int32))
        return (lambda index: grid_inputs.grid_batch(examples, index, matrix)), signature, rows
    signature = ({"image_input": tf.TensorSpec((None, matrix.shape[1]), tf.float32),
                  "caption_input": tf.TensorSpec((None, None), tf.int32)},
                 tf.TensorSpec((None, None), tf.int32))
    return (lambda index: inputs.sequence_batch(examples, index, matrix)), signature, None


def distribute(workers, plan, make_batch, signature, image_rows=None):
    """A distributed dataset of len(plan) steps: (x, y, weight) per replica and step, built only
    from this worker's shares (each worker's pipeline makes the batches of its own replicas).

    plan: the global batches (the same list on every worker); make_batch(index) -> (x, y);
    signature: the tf.TensorSpec structure of (x, y); weight: float32 scalar (replica_share).
    """
    import tensorflow as tf
    replicas = workers.replicas

    def dataset_fn(context):
        per_pipeline = replicas // context.num_input_pipelines
        mine = range(context.input_pipeline_id * per_pipeline, (context.input_pipeline_id + 1) * per_pipeline)

        def generate():
            for index in plan:
                for replica in mine:        # a worker's local replicas take consecutive elements
                    part, weight = replica_share(index, replica, replicas, image_rows)
                    x, y = make_batch(part)
                    yield x, y, np.float32(weight)

        spec = (*signature, tf.TensorSpec((), tf.float32))
        return tf.data.Dataset.from_generator(generate, output_signature=spec).prefetch(2)

    return workers.strategy.distribute_datasets_from_function(dataset_fn)


# ---- the distributed steps -----------------------------------------------------------------------
class _Steps:
    """One optimizer step per global batch: each replica's gradient of its weighted share of the
    loss, then the model's Keras optimizer in replica context, which sums the replicas'
    gradients (one all-reduce) and steps every copy of the variables alike."""

    def __init__(self, workers, model):
        if model.optimizer.clipvalue:
            raise PipelineError("an optimizer with clipvalue clips each replica's gradient, not "
                                "their sum: use clipnorm or global_clipnorm with several workers")
        self.workers, self.model = workers, model
        self._train = self._eval = None

    def _compiled(self, replica_fn, element_spec):
        import tensorflow as tf
        strategy = self.workers.strategy
        return tf.function(lambda element: strategy.run(replica_fn, args=element),
                           input_signature=[element_spec])

    def _apply(self, grads):
        """The optimizer step from this replica's gradient (inside strategy.run)."""
        optimizer = self.model.optimizer
        if optimizer.clipnorm or optimizer.global_clipnorm:
            grads = self._clip_as_one_process(grads)
        optimizer.apply_gradients(zip(grads, self.model.trainable_variables))

    def _clip_as_one_process(self, grads):
        """Gradients whose replica sum is one process's clipped gradient.

        Keras clips each replica's gradient BEFORE summing them, where one process clips the
        sum. Clipping by norm is a factor per variable (clipnorm) or for all (global_clipnorm),
        so it is computed here from the global norms and applied first; Keras' own clip then
        changes nothing (up to rounding). A dense gradient's norm needs the summed gradient:
        it is summed here and each replica passes on its 1/N share (a second sum per step). An
        embedding's IndexedSlices stay slices (Keras' Adam treats each occurrence on its own,
        so densifying would change the update): their norm is the root of the summed squares
        of every replica's values.
        """
        import tensorflow as tf
        optimizer, replicas = self.model.optimizer, self.workers.replicas
        context = tf.distribute.get_replica_context()
        dense = [i for i, g in enumerate(grads) if g is not None and not isinstance(g, tf.IndexedSlices)]
        sparse = [i for i, g in enumerate(grads) if isinstance(g, tf.IndexedSlices)]
        grads = list(grads)
        squares = {}
        if dense:
            for i, total in zip(dense, context.all_reduce("sum", [grads[i] for i in dense])):
                grads[i] = total / replicas
                squares[i] = tf.reduce_sum(tf.square(total))
        if sparse:
            local = [tf.reduce_sum(tf.square(grads[i].values)) for i in sparse]
            squares.update(zip(sparse, context.all_reduce("sum", local)))
        if optimizer.global_clipnorm:
            norm = tf.sqrt(tf.add_n(list(squares.values())))
            factors = dict.fromkeys(squares, optimizer.global_clipnorm / tf.maximum(norm, optimizer.global_clipnorm))
        else:
            factors = {i: optimizer.clipnorm / tf.maximum(tf.sqrt(sq), optimizer.clipnorm)
                       for i, sq in squares.items()}
        for i, factor in factors.items():
            g = grads[i]
            grads[i] = (tf.IndexedSlices(g.values * factor, g.indices, g.dense_shape)
                        if isinstance(g, tf.IndexedSlices) else g * factor)
        return grads

    def train_epoch(self, dataset):
        """Train one epoch of `dataset` (distribute()); returns the mean loss per row, as Keras
        reports it (each global batch's loss weighted by its rows)."""
        if self._train is None:
            self._train = self._compiled(self._replica_train, dataset.element_spec)
        return self._mean(self._train, dataset)

    def evaluate(self, dataset):
        """The mean loss per row over `dataset`, without dropout or optimizer steps."""
        if self._eval is None:
            self._eval = self._compiled(self._replica_eval, dataset.element_spec)
        return self._mean(self._eval, dataset)

    def _mean(self, step, dataset):
        total = rows = 0.0
        for element in dataset:
            loss, count = (float(np.asarray(self.workers.strategy.experimental_local_results(v)[0]))
                           for v in step(element))
            total, rows = total + loss * count, rows + count
        return total / max(rows, 1.0)


class CaptionSteps(_Steps):
    """The caption models (merge, inject, attention, transformer), loss = the model's compiled
    caption loss (captioning.models.registry.compile_model) plus its own added losses (the
    attention penalty).

    The compiled loss reduces by "sum" (Keras divides a mean-reduced loss by the replicas under
    a strategy; a sum it leaves alone). Of a share it is the share's summed word losses /
    (share rows * words_per_row); times share rows / global rows it becomes the share's part of
    the global batch's loss, so the replicas' sum is exactly one process's loss of that batch.
    The attention penalty is a mean over the share's words; it is weighted by share words /
    global words.
    """

    def __init__(self, workers, model):
        if getattr(model.loss, "reduction", None) != "sum":
            raise PipelineError(f"the caption loss must reduce by 'sum' to be shared out between "
                                f"workers, not {getattr(model.loss, 'reduction', None)!r}")
        super().__init__(workers, model)

    def _replica_train(self, x, y, weight):
        import tensorflow as tf
        model = self.model
        context = tf.distribute.get_replica_context()
        rows = weight * tf.cast(tf.shape(y)[0], tf.float32)
        words = weight * tf.reduce_sum(tf.cast(tf.not_equal(x["caption_input"], 0), tf.float32))
        all_rows, all_words = context.all_reduce("sum", [rows, words])
        with tf.GradientTape() as tape:
            loss = model.loss(y, model(x, training=True)) * (rows / all_rows)
            for extra in model.losses:
                loss += extra * (words / all_words)
        self._apply(tape.gradient(loss, model.trainable_variables))
        return context.all_reduce("sum", loss), all_rows

    def _replica_eval(self, x, y, weight):
        import tensorflow as tf
        context = tf.distribute.get_replica_context()
        rows = weight * tf.cast(tf.shape(y)[0], tf.float32)
        value = self.model.loss(y, self.model(x, training=False)) * rows
        total, all_rows = context.all_reduce("sum", [value, rows])
        return total / all_rows, all_rows


class ContrastiveSteps(_Steps):
    """A model whose loss needs the whole global batch (VSE++: every other pair of the batch is
    a negative): loss_fn(outputs (B, ...), labels (B,)) -> the batch's scalar loss, given the
    outputs and labels of all B real rows of the global batch in replica order.

    Each replica gathers the others' outputs as constants and its own live, so the loss has the
    same value everywhere and each replica's gradient is the part flowing through its own rows:
    their sum is one process's gradient of that batch. Padded shares (weight 0) add no rows.
    """

    def __init__(self, workers, model, loss_fn):
        super().__init__(workers, model)
        self.loss_fn = loss_fn

    def _global(self, outputs, labels, weight):
        """(all real outputs with ours live, all labels, global rows)."""
        import tensorflow as tf
        context = tf.distribute.get_replica_context()
        real = tf.cast(weight, tf.int32) * tf.shape(labels)[0]
        sizes = context.all_gather(real[None], axis=0)
        offset = tf.reduce_sum(sizes[:context.replica_id_in_sync_group])
        outputs, labels = outputs[:real], labels[:real]
        others = context.all_gather(tf.stop_gradient(outputs), axis=0)
        every = tf.concat([others[:offset], outputs, others[offset + real:]], axis=0)
        return every, context.all_gather(labels, axis=0), tf.cast(tf.reduce_sum(sizes), tf.float32)

    def _replica_train(self, x, labels, weight):
        import tensorflow as tf
        model = self.model
        with tf.GradientTape() as tape:
            every, all_labels, rows = self._global(model(x, training=True), labels, weight)
            loss = self.loss_fn(every, all_labels)
        self._apply(tape.gradient(loss, model.trainable_variables))
        return loss, rows

    def _replica_eval(self, x, labels, weight):
        every, all_labels, rows = self._global(self.model(x, training=False), labels, weight)
        return self.loss_fn(every, all_labels), rows


def build_in_scope(workers, build):
    """build() -> compiled keras model, its variables (and its optimizer's) made under the
    strategy, so they are mirrored on every replica."""
    with workers.strategy.scope():
        model = build()
        model.optimizer.build(model.trainable_variables)
    return model


def copy_state(source, target):
    """Weights, optimizer state and RNG state of `source` (a loaded checkpoint) into `target`
    (the same architecture, built under the strategy); PipelineError if they do not fit."""
    if len(source.variables) != len(target.variables) or \
            len(source.optimizer.variables) != len(target.optimizer.variables):
        raise PipelineError("the checkpoint's model or optimizer does not fit the model built "
                            "from model.json")
    for pair in (zip(source.variables, target.variables),
                 zip(source.optimizer.variables, target.optimizer.variables)):
        for src, dst in pair:
            dst.assign(np.asarray(src.numpy()))


# ---- the caption trainer under the strategy ---------------------------------------------------
def run_settings(args, config, train, dev, workers):
    """What every worker must share with the chief: the resume settings of the run folder
    (sizes, seed, batch, learning rate, features and tokenizer checksums) plus the epoch plan."""
    from captioning.training import trainer
    return {**trainer.resume_settings(args, config), "epochs": args.epochs,
            "patience": args.patience, "train_captions": len(train), "dev_captions": len(dev),
            "cluster": list(workers.cluster.addresses)}


def train_run(workers, args, run_dir, matrix, train, dev, config, scorer=None):
    """captioning.training.trainer.train_run on several workers: same run folder, same history,
    same selection, same resume, the same weights as one process with the same --batch-size
    (the global batch, module docstring). Every worker calls it; the chief alone reads and writes
    run_dir and scores dev BLEU (scorer). After every epoch the workers compare their weights
    (Workers.check_in_step). Returns the final state dict on the chief, None on the others.
    """
    if config.get("mode", registry.MODE) != "sequence":
        raise PipelineError("--mode pairs trains one photo per batch in one process; several "
                            "workers train whole captions (--mode sequence)")
    with workers.peers_watched():
        return _train_run(workers, args, run_dir, matrix, train, dev, config, scorer)


def _train_run(workers, args, run_dir, matrix, train, dev, config, scorer):
    from captioning.training import trainer
    from captioning.training.run_folder import LAST_FILE
    trainer.seed_everything(args.seed)
    settings = trainer.resume_settings(args, config)
    workers.check_settings(run_settings(args, config, train, dev, workers))
    run = {}    # the chief's: run folder, state, loaded checkpoint

    def open_folder():
        folder = trainer.run_folder(run_dir, scorer is not None, args.patience, args.keep_epochs)
        if getattr(args, "overwrite", False):
            folder.clear()
        state = folder.resume(settings)
        if state is None:
            state = folder.new_state(best_val_loss=None)
        else:
            config.update(read_json(folder.checkpoint / registry.CONFIG_FILE), **{
                k: config[k] for k in ("features_file", "data_dir")})
        run.update(folder=folder, state=state)
        return {"epoch": state["epoch"], "finished": folder.finished(state, args.epochs)}

    start = workers.on_chief(open_folder)
    if start["finished"]:
        state = run.get("state")
        if state:
            print(f"{run_dir}: already trained {state['epoch']} epochs "
                  f"(best epoch {state['best_epoch']}); nothing to do (--overwrite starts again)")
        return state
    model = build_in_scope(workers, lambda: registry.compile_model(
        registry.build_from_config(config), args.learning_rate, args.label_smoothing,
        inputs.words_per_row(train, "sequence")))

    def load_checkpoint():
        folder, state = run["folder"], run["state"]
        if start["epoch"]:
            copy_state(registry.load_keras(folder.checkpoint / LAST_FILE), model)
            trainer.restore_rng_state(model, state.get("rng"))
            print(f"resuming {run_dir} after epoch {state['epoch']} on {workers.cluster.size} workers",
                  flush=True)
        else:
            config["layers"] = registry.layer_names(model)
        state["settings"] = settings
        folder.write_settings(args, **{k: config[k] for k in (
            "feature_dim", "vocab_size", "max_length", "features_sha256", "tokenizer_sha256")},
            train_captions=len(train), dev_captions=len(dev), workers=workers.cluster.size)
        return True

    workers.on_chief(load_checkpoint)
    workers.broadcast_variables(model.variables + model.optimizer.variables)
    steps = CaptionSteps(workers, model)
    make_batch, signature, rows = caption_batches(config, train, matrix)
    make_dev, _, dev_rows = caption_batches(config, dev, matrix)
    dev_plan = caption_plan(config, dev, args.batch_size)
    dev_scale = trainer.dev_loss_scale(model, dev, "sequence")
    for epoch in range(start["epoch"], args.epochs):
        started = time.time()
        plan = caption_plan(config, train, args.batch_size, args.seed, epoch)
        loss = steps.train_epoch(distribute(workers, plan, make_batch, signature, rows))
        val = steps.evaluate(distribute(workers, dev_plan, make_dev, signature, dev_rows)) * dev_scale
        workers.check_in_step(model, f"after epoch {epoch + 1}")
        if workers.on_chief(lambda: _keep_epoch(run, model, config, scorer, epoch, loss, val, started)):
            break
    workers.report(start["epoch"], epoch + 1)
    return run.get("state")


def _keep_epoch(run, model, config, scorer, epoch, loss, val, started):
    """The chief's end of an epoch, as trainer.make_keeper's callback does it: history row,
    selection, one checkpoint, the progress line. Returns True when the run stops early."""
    import keras
    from captioning.training import trainer
    folder, state = run["folder"], run["state"]
    bleu4 = round(float(scorer(model, config)), 6) if scorer else None
    lr = float(f"{float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)):.6g}")
    row = {"epoch": epoch + 1, "loss": round(loss, 6), "val_loss": round(val, 6), "dev_bleu4": bleu4,
           "seconds": round(time.time() - started, 1), "lr": lr}
    improved = (folder.record(state, row, bleu4, best={"best_val_loss": val}) if scorer else
                folder.record(state, row, val, best={"best_dev_bleu4": bleu4}))
    if improved:
        config.update(best_epoch=state["best_epoch"], best_val_loss=val, best_dev_bleu4=bleu4)
    config["epochs_trained"] = state["best_epoch"]
    state["rng"] = trainer.rng_state(model)
    folder.save(model, state, config, improved)
    bleu_text = f"  dev BLEU-4 {bleu4:.4f}" if scorer else ""
    print(f"epoch {epoch + 1}: loss {loss:.4f}  dev {val:.4f}{bleu_text}  "
          f"best epoch {state['best_epoch']}", flush=True)
    return bool(state["stopped_early"])


# ---- n workers on this machine ------------------------------------------------------------------
def free_ports(n, host="127.0.0.1"):
    """n distinct free TCP ports on `host` (held together while picked, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def without_option(argv, name):
    """argv without `name VALUE` / `name=VALUE` (the launcher's own option, not the workers')."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _die_with_parent():
    """In a worker before exec: the kernel kills it if the launcher dies (Linux), so no worker
    is left waiting in a collective for peers that are gone."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


def _stream(pipe, prefix, out):
    for line in iter(pipe.readline, ""):
        out.write(prefix + line)
        out.flush()
    pipe.close()


def launch_local(n_workers, argv, script=None, timeout=None, host="127.0.0.1", env=None):
    """Run `python script argv` as n_workers workers of one cluster on `host`; return the chief's
    exit status (or, when a failing worker ended the run, that worker's). script: default the
    running script (train.py ... --local-workers N starts N of train.py).

    Each worker gets a free port and its TF_CONFIG, a share of the CPU cores
    (TF_NUM_INTRAOP_THREADS), and its output lines prefixed "[worker R] " (stdout to stdout,
    stderr to stderr). When one exits with an error the others are killed (a peer left alone
    would wait in a collective). timeout: seconds for the whole run, None = no limit; past it
    all are killed and 124 is returned. Ctrl-C kills all and returns 130.
    """
    if n_workers < 2:
        raise PipelineError(f"--local-workers needs at least 2 workers, got {n_workers}")
    if os.environ.get("TF_CONFIG", "").strip():
        raise PipelineError("--local-workers makes each worker's TF_CONFIG: unset TF_CONFIG")
    script = Path(script or sys.argv[0]).resolve()
    addresses = [f"{host}:{port}" for port in free_ports(n_workers, host)]
    threads = str(max(1, (os.cpu_count() or 1) // n_workers))
    procs, streams = [], []
    for rank in range(n_workers):
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": tf_config(addresses, rank),
                      "TF_NUM_INTRAOP_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, str(script), *argv], env=worker_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        procs.append(proc)
        for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            streams.append(threading.Thread(target=_stream, args=(pipe, f"[worker {rank}] ", out), daemon=True))
            streams[-1].start()
    print(f"started {n_workers} workers on {', '.join(addresses)} "
          f"(pids {' '.join(str(p.pid) for p in procs)})", flush=True)
    started, status = time.monotonic(), None
    try:
        while status is None:
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                status = codes[failed]
                if any(c is None for c in codes):
                    print(f"error: worker {failed} exited with status {status}; stopped the other "
                          f"workers", file=sys.stderr, flush=True)
                status = codes[0] if codes[0] not in (None, 0) else status
            elif all(c == 0 for c in codes):
                status = 0
            elif timeout is not None and time.monotonic() - started > timeout:
                print(f"error: the {n_workers} local workers did not finish within {timeout:g} s; "
                      f"stopped them", file=sys.stderr, flush=True)
                status = 124
            else:
                time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()     # SIGKILL: TensorFlow's servers catch SIGTERM and go on waiting
        for proc in procs:
            proc.wait()
        for thread in streams:
            thread.join(timeout=5)
    return status
