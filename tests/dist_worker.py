"""What ``torchrun`` starts in the distributed tests: the hmq command, with a failure injected on
one rank when ``HMQ_TEST_FAIL_RANK`` names it (to check that it takes the others down), the rank
``HMQ_TEST_SLOW_RANK`` names slowed just after it looks for a resume state (to check that the
others wait for it before writing one), or every process killed once ``HMQ_TEST_KILL_AFTER`` layers
are saved (to check resuming)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import quant.gptq  # noqa: E402
import quant.methods  # noqa: E402

if os.environ.get("HMQ_TEST_FAIL_RANK") not in (None, "") and os.environ.get("HMQ_TEST_FAIL_RANK") == os.environ.get("RANK"):
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")

    quant.methods.gptq_quantize = broken

if os.environ.get("HMQ_TEST_SLOW_RANK") not in (None, "") and os.environ.get("HMQ_TEST_SLOW_RANK") == os.environ.get("RANK"):
    import pathlib
    import time

    is_file = pathlib.Path.is_file

    def slow_is_file(self, *args, **kwargs):
        found = is_file(self, *args, **kwargs)
        if self.name == "state.json":
            time.sleep(2)  # long enough for a process that does not wait to write the state meanwhile
        return found

    pathlib.Path.is_file = slow_is_file

if os.environ.get("HMQ_TEST_KILL_AFTER"):
    import quant.resume

    save = quant.resume.LayerState.save

    def save_then_die(self, i, *args, **kwargs):
        save(self, i, *args, **kwargs)
        if self.done == int(os.environ["HMQ_TEST_KILL_AFTER"]):
            os._exit(137)  # as SIGKILL: nothing is cleaned up

    quant.resume.LayerState.save = save_then_die

sys.exit(cli.main(sys.argv[1:]))
