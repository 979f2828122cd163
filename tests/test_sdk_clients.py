"""The official SDKs work through the proxy unchanged (README "Request handling", steps 5 and 7).

Each SDK is pointed at the proxy with the *client* key, exactly as an
application would be. The answer must parse, and the upstream must have seen
the provider key in that provider's header and the client key nowhere.
"""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import openai
import pytest

from demo.fake_upstream import FakeUpstreamThread, RecordedRequest
from tests.conftest import ANTHROPIC_KEY, CLIENT_KEY, OPENAI_KEY, make_jwt, proxy_config
from tests.supervisor_process import Supervisor

PROMPT = "say hello through the gateway"
REPLY = "Echo: " + PROMPT  # what the fake provider answers
pytestmark = pytest.mark.usefixtures("fresh")  # each test sees only its own requests


@pytest.fixture(scope="module")
def sup(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    return module_supervisor(proxy_config(up.url))


def openai_client(sup: Supervisor, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=sup.url + "/openai/v1", api_key=key, max_retries=0, timeout=10)


def anthropic_client(sup: Supervisor, key: str = CLIENT_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sup.url + "/anthropic", api_key=key, max_retries=0,
                               timeout=10)  # fmt: skip


def only_request(up: FakeUpstreamThread) -> RecordedRequest:
    requests = up.wait_for_requests(1)
    assert len(requests) == 1
    return requests[0]


def assert_openai_credentials(req: RecordedRequest) -> None:
    assert req.header_values("authorization") == [f"Bearer {OPENAI_KEY}".encode()]
    assert req.header_values("x-api-key") == []
    assert CLIENT_KEY.encode() not in req.raw_head


def assert_anthropic_credentials(req: RecordedRequest, client_key: str = CLIENT_KEY) -> None:
    assert req.header_values("x-api-key") == [ANTHROPIC_KEY.encode()]
    assert req.header_values("authorization") == []
    assert client_key.encode() not in req.raw_head


MESSAGES = [{"role": "user", "content": PROMPT}]


# --- openai ------------------------------------------------------------------------------


def test_openai_chat_completion(sup: Supervisor, up: FakeUpstreamThread) -> None:
    completion = openai_client(sup).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    req = only_request(up)
    assert req.target == b"/v1/chat/completions"
    assert req.json()["messages"] == MESSAGES
    assert_openai_credentials(req)


def test_openai_streamed_chat_completion(sup: Supervisor, up: FakeUpstreamThread) -> None:
    stream = openai_client(sup).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, stream=True
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(chunks) > 3
    assert "".join(deltas) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_openai_credentials(only_request(up))


def test_openai_models_list(sup: Supervisor, up: FakeUpstreamThread) -> None:
    models = openai_client(sup).models.list()
    assert [m.id for m in models] == ["fake-gpt", "fake-gpt-mini"]
    req = only_request(up)
    assert req.target == b"/v1/models"
    assert_openai_credentials(req)


def test_openai_wrong_key_raises_authentication_error(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        openai_client(sup, key="not-a-valid-key").models.list()
    assert info.value.status_code == 401
    assert up.requests == []


# --- anthropic ---------------------------------------------------------------------------


def test_anthropic_message(sup: Supervisor, up: FakeUpstreamThread) -> None:
    message = anthropic_client(sup).messages.create(
        model="fake-claude", max_tokens=64, messages=MESSAGES
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    req = only_request(up)
    assert req.target == b"/v1/messages"
    assert req.header("anthropic-version") is not None  # SDK headers go through
    assert_anthropic_credentials(req)


def test_anthropic_streamed_message(sup: Supervisor, up: FakeUpstreamThread) -> None:
    with anthropic_client(sup).messages.stream(
        model="fake-claude", max_tokens=64, messages=MESSAGES
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == REPLY
    assert final.content[0].text == REPLY
    assert_anthropic_credentials(only_request(up))


def test_anthropic_sdk_with_a_jwt_as_api_key(sup: Supervisor, up: FakeUpstreamThread) -> None:
    token = make_jwt()
    message = anthropic_client(sup, key=token).messages.create(
        model="fake-claude", max_tokens=64, messages=MESSAGES
    )
    assert message.content[0].text == REPLY
    assert_anthropic_credentials(only_request(up), client_key=token)


def test_anthropic_wrong_key_raises_authentication_error(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic_client(sup, key="not-a-valid-key").messages.create(
            model="fake-claude", max_tokens=64, messages=MESSAGES
        )
    assert info.value.status_code == 401
    assert up.requests == []
