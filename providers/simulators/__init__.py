"""Wire-faithful fakes of VibeDream and WaveSpeed, over real HTTP, with fault knobs.

    from providers.simulators import SimConfig, SimulatorServer

    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.1)) as sim:
        httpx.post(f"{sim.base_url}/api/v3/wavespeed-ai/flux-dev", ...)
        sim.config.rate_limit = 1.0  # every submit now answers 429

Every knob (server-wide and per-request `[sim:...]` prompt directives) is listed in
`providers/simulators/config.py`. Wire formats: `vibedream.py`, `wavespeed.py`.
"""

from .app import SimulatorApp, create_app
from .config import SimConfig
from .server import SimulatorServer, serve

__all__ = ["SimConfig", "SimulatorApp", "SimulatorServer", "create_app", "serve"]
