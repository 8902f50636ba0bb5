"""Many workers against one Prefect server: wall time of an inbox, and database errors in the server log.

    python benchmarks/pool.py [--workers 4] [--drives 8] [--database postgresql://postgres@127.0.0.1:5432/test]
                              [--size 96x72] [--frames 23] [--out ...]

What a user does, with the deployment scripts: a server on 127.0.0.1 (a temporary PREFECT_HOME;
its database a fresh PostgreSQL database created beside the one ``--database`` names and dropped
afterwards, or SQLite without ``--database``), ``deploy/deploy.sh``, ``deploy/start-workers.sh N``
(CPU process workers, one thread each), then ``prefect deployment run autolabel/apollo`` on an
ApolloScape-layout inbox of synthetic drives. Records the parent run's wall time, the workers that
took the drives, and every line of the server log that reports a database error ("database is
locked", OperationalError, DBAPIError, deadlock); then stops workers and server. A tiny teacher and
refiner are trained first (the user's own job; not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from autolabel.storage.store import SequenceStore  # noqa: E402
from autolabel.storage.synthetic import SyntheticConfig, drive_configs  # noqa: E402
from autolabel.storage.synthetic_io import write_apollo_layout  # noqa: E402

DB_ERRORS = ("database is locked", "OperationalError", "DBAPIError", "deadlock detected")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> None:
    code = "import sys; from autolabel.cli import main; sys.argv=['autolabel', *sys.argv[1:]]; main()"
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env=env or {**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"autolabel {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def admin(url: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--drives", type=int, default=8)
    parser.add_argument("--size", default="96x72")
    parser.add_argument("--frames", type=int, default=23)
    parser.add_argument("--database", default=None, help="PostgreSQL URL whose server gets a fresh database")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    drive = SyntheticConfig(width=w, height=h, frames=args.frames, seed=0)
    with tempfile.TemporaryDirectory(prefix="autolabel-pool-") as name:
        tmp = Path(name)
        log("training a tiny teacher and refiner on two other drives")
        write_apollo_layout(tmp / "train-inbox", drive_configs(2, drive.model_copy(update={"seed": 50})))
        cli("ingest", "apollo", str(tmp / "train-inbox"), "--store", str(tmp / "train.zarr"), "--window", "21")
        cli("train-teacher", "--store", str(tmp / "train.zarr"), "--out", str(tmp / "teacher.pt"), "--arch",
            "unet-tiny", "--max-steps", "5", "--crop", "64")
        cli("train-refiner", "--store", str(tmp / "train.zarr"), "--teacher", str(tmp / "teacher.pt"), "--out",
            str(tmp / "refiner.pt"), "--arch", "refine-tiny", "--steps", "3", "--crop", "32", "--max-cycle", "2",
            "--flow", "dis-fast")
        write_apollo_layout(tmp / "inbox", drive_configs(args.drives, drive))
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "AUTOLABEL_REPO": str(REPO), "AUTOLABEL_VENV": sys.prefix,
               "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_API_HOST": "127.0.0.1",
               "PREFECT_SERVER_API_PORT": str(port), "PREFECT_API_URL": api,
               "AUTOLABEL_STORE": str(tmp / "apollo.zarr"), "AUTOLABEL_INBOX": str(tmp / "inbox"),
               "AUTOLABEL_TEACHER": str(tmp / "teacher.pt"), "AUTOLABEL_REFINER": str(tmp / "refiner.pt"),
               "AUTOLABEL_EXPORT": str(tmp / "export"), "AUTOLABEL_FLOW_BACKEND": "dis-fast",
               "AUTOLABEL_STORE_ROOTS": str(tmp), "AUTOLABEL_INBOX_ROOTS": str(tmp),
               "AUTOLABEL_EXPORT_ROOTS": str(tmp), "AUTOLABEL_DEVICE": "cpu", "PREFECT_WORKER_QUERY_SECONDS": "1",
               "OMP_NUM_THREADS": "1", "AUTOLABEL_THREADS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        database = None
        if args.database:
            database = args.database.rsplit("/", 1)[0] + f"/autolabel_bench_{uuid.uuid4().hex[:12]}"
            admin(args.database, f'CREATE DATABASE "{database.rsplit("/", 1)[1]}"')
            env["AUTOLABEL_DATABASE_URL"] = database
        server_log = tmp / "server.log"
        server = None
        try:
            with open(server_log, "wb") as out:
                server = subprocess.Popen(["bash", "deploy/start-server.sh"], env=env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"the server did not start:\n{server_log.read_text()[-2000:]}")
                time.sleep(1)
            log(f"server up ({server_log.read_text().splitlines()[0]})")
            for script in (["bash", "deploy/deploy.sh"], ["bash", "deploy/start-workers.sh", str(args.workers)]):
                done = subprocess.run(script, env=env, cwd=REPO, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            start = time.perf_counter()
            out_text = subprocess.run(["prefect", "deployment", "run", "autolabel/apollo"], env=env, cwd=REPO,
                                      capture_output=True, text=True).stdout
            run_id = next(line.split("UUID:")[1].strip() for line in out_text.splitlines() if "UUID:" in line)
            log(f"autolabel/apollo on {args.drives} drives with {args.workers} workers: run {run_id}")
            while True:
                run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
                if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                if time.perf_counter() - start > args.timeout:
                    raise SystemExit(f"the parent run did not finish in {args.timeout} s")
                time.sleep(1)
            seconds = time.perf_counter() - start
            children = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["label-sequence"]}}},
                                  timeout=30).json()
            store = SequenceStore.open(str(tmp / "apollo.zarr"))
            workers = sorted({store.sequence(s).stages.get("labelled", {}).get("worker", "?")
                              for s in store.sequence_ids()})
        finally:
            subprocess.run(["bash", "deploy/stop.sh"], env=env, cwd=REPO, capture_output=True, timeout=180)
            if server is not None and server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
            if database is not None:
                admin(args.database, f'DROP DATABASE IF EXISTS "{database.rsplit("/", 1)[1]}" WITH (FORCE)')
        errors = [line for line in server_log.read_text(errors="replace").splitlines()
                  if any(e in line for e in DB_ERRORS)]
    result = {"workers": args.workers, "drives": args.drives, "database": "PostgreSQL" if database else "SQLite",
              "parent_state": run["state_type"], "seconds": round(seconds, 1),
              "sequence_runs": {s: sum(c["state_type"] == s for c in children)
                                for s in {c["state_type"] for c in children}},
              "labelled_by": workers, "database_errors": len(errors), "error_lines": errors[:20]}
    print_table("autolabel/apollo on one server (process workers)",
                ["workers", "drives", "database", "parent", "seconds", "database errors"],
                [[args.workers, args.drives, result["database"], run["state_type"], result["seconds"], len(errors)]])
    print("labelled by: " + ", ".join(workers))
    write_json("pool", {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()},
                        "result": result}, args.out)
    if errors or run["state_type"] != "COMPLETED":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
