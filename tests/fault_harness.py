"""Fault injection for the integration tests, kept out of the product.

A test that wants a process to misbehave starts it through this module instead of `python -m
ktfed` (LocalFederation.start_participant and start_coordinator do so when the environment they
pass names one of FAULTS):

    python -m tests.fault_harness participant run --site ...    (the ktfed CLI's own arguments)
    python -m tests.fault_harness coordinator serve --listen ...

which wraps the named seams of the product, then runs the ktfed CLI unchanged, in a real process
with its real certificates and sockets. Participant (its round recipe and secure aggregation):

    KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S=S   Round.upload waits S seconds first (a site that trained
                                          but holds its update back; SIGTERM still stops it)
    KTFED_FAULT_LEAK_PRIVATE=1            Round.update adds the private factors (the egress guard
                                          must stop the update)
    KTFED_FAULT_EXIT_AFTER_SECAGG_STEP=X  the process exits (code 17) once step X was submitted
    KTFED_TEST_EXPORT_SECAGG_INPUT=DIR    each SecAggUpdate writes the site's plain update and its
                                          encoded input to DIR, so a test can check the sum

Coordinator (its store and its start):

    KTFED_FAULT_PAUSE_BEFORE_COMMIT_S=S   a completed round's state file is written, then S seconds
                                          pass before its records are committed (Store._write_state,
                                          rounds >= 1): a kill meanwhile is a crash mid-save
    KTFED_FAULT_PAUSE_IN_RESUME_S=S       Coordinator.resume waits S seconds first: the server
                                          listens and answers health NOT_SERVING meanwhile
    KTFED_FAULT_SHIFT_STATE=V             a hostile coordinator: the first aggregate it computes
                                          gets V added to every element (a model of its own in
                                          place of the sites' mean; the sites must refuse it)
    KTFED_FAULT_ROUND_EPOCHS=N            a hostile coordinator: every round assignment asks for
                                          N local epochs, whatever the run config says
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

FAULTS = ("KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S", "KTFED_FAULT_LEAK_PRIVATE", "KTFED_FAULT_EXIT_AFTER_SECAGG_STEP",
          "KTFED_TEST_EXPORT_SECAGG_INPUT", "KTFED_FAULT_PAUSE_BEFORE_COMMIT_S", "KTFED_FAULT_PAUSE_IN_RESUME_S",
          "KTFED_FAULT_SHIFT_STATE", "KTFED_FAULT_ROUND_EPOCHS")
ROOT = Path(__file__).resolve().parent.parent


def wanted(env: dict | None) -> bool:
    return any(env and env.get(name) for name in FAULTS)


def command(ktfed_command: list[str]) -> list[str]:
    """The launcher's `python -m ktfed ...` command, run through this harness."""
    i = ktfed_command.index("ktfed")
    return [*ktfed_command[:i], "tests.fault_harness", *ktfed_command[i + 1:]]


def environment(env: dict) -> dict:
    """`env` with this checkout importable (the harness lives in tests/)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}


def _wrap(owner, name: str, wrapper) -> None:
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(lambda *args, **kwargs: wrapper(original, *args, **kwargs)))


def _seconds(env, name: str) -> float:
    return float(env.get(name, "0") or 0)


def install(env=os.environ) -> None:
    install_participant(env)
    install_coordinator(env)


def install_participant(env) -> None:
    log = logging.getLogger("participant.round")
    pause = _seconds(env, "KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S")
    if pause:
        from participant.round import Round

        def paused_upload(upload, self, messages):
            log.warning("%s: fault injection: pausing %.1fs before uploading round %d", self.site_run.site, pause,
                        self.round)
            self.site_run.stopping.wait(pause)
            return upload(self, messages)
        _wrap(Round, "upload", paused_upload)
    if env.get("KTFED_FAULT_LEAK_PRIVATE") == "1":
        from participant.round import Round

        def leaking_update(update, self, state):
            return {**update(self, state), **self.site_run.trainer.private_tensors()}
        _wrap(Round, "update", leaking_update)
    exit_step = env.get("KTFED_FAULT_EXIT_AFTER_SECAGG_STEP")
    if exit_step:
        from participant.secagg_update import SecAggSession

        def dying_submit(submit, self, step, payload):
            delivered = submit(self, step, payload)
            if delivered and step == exit_step:
                log.warning("%s: fault injection: exiting after secure aggregation step %s", self.site_run.site, step)
                os._exit(17)
            return delivered
        _wrap(SecAggSession, "submit", dying_submit)
    folder = env.get("KTFED_TEST_EXPORT_SECAGG_INPUT")
    if folder:
        from participant.secagg_update import SecAggUpdate

        def exporting_init(init, self, site, run_id, round_no, *args, **kwargs):
            init(self, site, run_id, round_no, *args, **kwargs)
            out = Path(folder)
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{site}-round{round_no}-update.npy", self.flat, allow_pickle=False)
            np.save(out / f"{site}-round{round_no}-encoded.npy", self.encoded, allow_pickle=False)
        _wrap(SecAggUpdate, "__init__", exporting_init)


def install_coordinator(env) -> None:
    commit_pause = _seconds(env, "KTFED_FAULT_PAUSE_BEFORE_COMMIT_S")
    if commit_pause:
        from coordinator.store import Store

        def paused_write(write_state, self, run_id, round_no, state):
            written = write_state(self, run_id, round_no, state)
            if round_no >= 1:   # round 0 is the run's creation, not a completed round
                logging.getLogger("coordinator.store").warning(
                    "fault injection: pausing %.1fs between state file and commit", commit_pause)
                time.sleep(commit_pause)
            return written
        _wrap(Store, "_write_state", paused_write)
    resume_pause = _seconds(env, "KTFED_FAULT_PAUSE_IN_RESUME_S")
    if resume_pause:
        from coordinator.coordinator import Coordinator

        def paused_resume(resume, self, *args, **kwargs):
            logging.getLogger("coordinator.server").warning(
                "fault injection: pausing %.1fs before resuming (health NOT_SERVING)", resume_pause)
            time.sleep(resume_pause)
            return resume(self, *args, **kwargs)
        _wrap(Coordinator, "resume", paused_resume)
    shift = float(env.get("KTFED_FAULT_SHIFT_STATE", "0") or 0)
    if shift:
        from coordinator.strategy import FedAvg

        shifted = []

        def hostile_finish(finish, self):
            result = finish(self)
            if shifted:
                return result
            shifted.append(True)
            logging.getLogger("coordinator.strategy").warning("fault injection: adding %g to the aggregate", shift)
            return {name: (np.asarray(result[name]) + shift).astype(np.asarray(result[name]).dtype) for name in result}
        _wrap(FedAvg, "finish", hostile_finish)
    epochs = int(env.get("KTFED_FAULT_ROUND_EPOCHS", "0") or 0)
    if epochs:
        from coordinator import messages

        def hostile_assignment(round_assignment, *args, **kwargs):
            message = round_assignment(*args, **kwargs)
            message.round.train.epochs = epochs
            return message
        _wrap(messages, "round_assignment", hostile_assignment)


if __name__ == "__main__":
    install()
    from ktfed.cli import main

    sys.exit(main(sys.argv[1:]))
