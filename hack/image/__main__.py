"""python hack/image COMMAND ...

build [--import SOCKET] [--out PATH]   build the image (cached layers) into ~/.cache/k2-image/worker-dev.oci.tar
run [--uid UID] ARGS...                run ARGS in the built image with runc: non-root, read-only root, /tmp tmpfs
import SOCKET [ARCHIVE]                import the archive into that containerd's k8s.io namespace
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # hack/ instead of hack/image/: `image` is this package

from image import builder, containerd, runc  # noqa: E402

COMMANDS = {"build": builder.main, "run": runc.main, "import": containerd.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
