from pipelines.cli import main

# The guard matters: worker processes are spawned and re-import the parent's main module.
if __name__ == "__main__":
    raise SystemExit(main())
