"""The console script (`embedkit.cli.entry`) ends the process without the interpreter's teardown
once a command is done: exit codes, output, atexit handlers and still-running work are kept."""

import subprocess
import sys
import textwrap

import pytest

# Runs entry() as the console script does, reporting whether the fast exit (os._exit) was taken.
SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys, threading, time
    real = os._exit
    def spy(code):
        print("FAST_EXIT", code, file=sys.stderr, flush=True)
        real(code)
    os._exit = spy
    atexit.register(lambda: print("ATEXIT_RAN", file=sys.stderr, flush=True))
    sys.argv = ["embedkit", *sys.argv[1:]]
    import embedkit.cli as cli
    if os.environ.get("WORKER"):  # a non-daemon thread still working when the command returns
        returned = threading.Event()
        real_main = cli.main
        def main():
            try:
                real_main()
            finally:
                returned.set()
        cli.main = main
        def work():  # still working when main() returns, however long the command took
            returned.wait()
            time.sleep(0.3)
            print("WORKER_DONE", file=sys.stderr, flush=True)
        threading.Thread(target=work).start()
    cli.entry()
    """
)


def run(*args, env_extra=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "args, code",
    [
        (["models", "musicnn*"], 0),  # success
        (["tag", "no-such-run", "x.wav"], 1),  # a one-line error
        (["tag", "--bogus"], 2),  # a usage error
    ],
)
def test_exit_codes_output_and_atexit_survive_the_fast_exit(args, code):
    res = run(*args)
    assert res.returncode == code, res.stderr
    assert f"FAST_EXIT {code}" in res.stderr and "ATEXIT_RAN" in res.stderr
    assert "Traceback" not in res.stderr
    if code == 0:
        assert "musicnn-msd" in res.stdout and "musicnn-mtt" in res.stdout  # stdout flushed, complete
    if code == 1:
        assert "error: " in res.stderr and "no-such-run" in res.stderr


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_a_thread_still_working_gets_the_normal_exit():
    res = run("models", "musicnn*", env_extra={"WORKER": "1"})
    assert res.returncode == 0, res.stderr
    assert "FAST_EXIT" not in res.stderr  # the interpreter's exit, which waits for the thread
    assert "WORKER_DONE" in res.stderr and "ATEXIT_RAN" in res.stderr


def test_a_closed_pipe_is_not_an_error():
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader went away (`embedkit models | head -0`)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (0, 1) and b"Traceback" not in err and b"Exception ignored" not in err, err
