import pytest

from tests.helpers import AgentEnv


@pytest.fixture
def agent_env(tmp_path):
    """An isolated agent; whatever supervisor a test leaves running is stopped afterwards."""
    env = AgentEnv(tmp_path)
    env.write_config()
    yield env
    env.agentctl("stop")
    env.kill_leftovers()
