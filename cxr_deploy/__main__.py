"""``python -m cxr_deploy``: the ``cxr-deploy`` command, for launchers that start a module rather
than a script (``torchrun --nproc-per-node N -m cxr_deploy train ...``)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="cxr-deploy")
