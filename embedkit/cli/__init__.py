"""`embedkit` command line. Each command validates its arguments, calls one library function
and prints a summary. Heavy libraries are imported inside commands so `--help` is instant.
Errors raised on purpose (EmbedkitError) become one line on stderr and exit code 1.

The commands live by group (``data``: models, extract, fit, predict, report; ``train``:
train-cnn, finetune, run; ``deploy``: tag, untag, stream, export, serve; ``monitor``; ``similar``: similar, playlist, index; ``library``: review,
labels export|import, retrain, audit) and share ``common``
(errors, console, the progress bar, the end-of-job summary, the shared options); this module
registers them on ``app``, in the order ``embedkit --help`` lists them."""

from __future__ import annotations

import os
import sys

import typer

from . import data, deploy, library, monitor, similar, train
from .common import handle_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Music genre classification: pretrained embeddings + light heads vs. a CNN from scratch.",
)

for _name, _command in (
    ("models", data.models_cmd),
    ("extract", data.extract_cmd),
    ("report", data.report_cmd),
    ("train-cnn", train.train_cnn_cmd),
    ("finetune", train.finetune_cmd),
    ("run", train.run_cmd),
    ("fit", data.fit_cmd),
    ("predict", data.predict_cmd),
    ("stream", deploy.stream_cmd),
    ("export", deploy.export_cmd),
    ("tag", deploy.tag_cmd),
    ("untag", deploy.untag_cmd),
    ("serve", deploy.serve_cmd),
    ("monitor", monitor.monitor_cmd),
    ("similar", similar.similar_cmd),
    ("playlist", similar.playlist_cmd),
    ("index", similar.index_cmd),
    ("audit", library.audit_cmd),
    ("retrain", library.retrain_cmd),
    ("review", library.review_cmd),
):
    app.command(_name)(handle_errors(_command))
for _name, _command in (("export", library.labels_export_cmd), ("import", library.labels_import_cmd)):
    library.labels_app.command(_name)(handle_errors(_command))
app.add_typer(library.labels_app, name="labels")
del _name, _command


def main():
    """The CLI: runs one command, exits by SystemExit as typer does (what tests call)."""
    # torch's OpenMP threads spin-wait by default; on a busy 2-core laptop that wastes most of
    # the CPU (musicnn extraction measured 2.7x slower under load). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(prog_name="embedkit")


def entry():  # the console script
    """``main()``, then end the process without the interpreter's teardown.

    Once torch is imported, the teardown (clearing every module, collecting torch's objects,
    libtorch's static destructors) costs 0.3-0.6 s of wall time on a 2-core machine
    (``python -c "import torch"`` 1.56-1.68 s vs 1.19-1.26 s with os._exit): a fifth of a
    one-file ``embedkit tag``. The command is finished by then: the atexit handlers still run
    (multiprocessing, weakref finalizers, temporary folders), the standard streams are flushed,
    and every artefact was already written atomically and closed. Daemon threads (rich's refresh
    thread) are dropped, as the normal exit drops them; when a non-daemon thread is still alive
    the normal exit runs instead (it waits for that thread), so nothing still working is cut short.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe (`embedkit tag ... | head`): nothing more to say
            pass
    os._exit(code)
