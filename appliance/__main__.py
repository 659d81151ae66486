from appliance.cli import main

# The guard matters: the worker is started with multiprocessing's "spawn", which imports the parent's __main__
# module in the child under another name.
if __name__ == "__main__":
    raise SystemExit(main())
