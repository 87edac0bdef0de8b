import sys
import time

import forkvm

guest = sys.argv[1]  # the test guest: tests/guest/build.sh prints its path
console = forkvm.ConsoleBuffer()
with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=generation", console=console) as vm:
    while "generation 0" not in console.text():  # the guest prints its generation
        time.sleep(0.01)
    consoles = [forkvm.ConsoleBuffer() for _ in range(2)]
    children = vm.fork(consoles)  # two running copies, continuing from this instant
    for i, (child, out) in enumerate(zip(children, consoles)):
        while "generation 1" not in out.text():
            pass
        print(f"child {i}: generation {child.identity.generation}")
        child.close()
    try:
        vm.exec(["echo", "hi"])  # the agent needs a vsock device and forkvm's Linux image
    except forkvm.NoDeviceError as e:
        print(f"no agent here: {e}")
