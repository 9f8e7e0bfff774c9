"""Python client for the lstmgen gRPC text-generation server (needs only grpcio and protobuf).

    from lstmgen_client import Client
    with Client("localhost:50051") as client:
        for chunk in client.generate_stream("ROMEO:", max_new_tokens=200, temperature=0.8, seed=1):
            print(chunk.text, end="", flush=True)
"""
from lstmgen_client.client import AsyncClient, Client
from lstmgen_client.conversation import AsyncConversation, Conversation
from lstmgen_client.frames import AsyncFrameCall, FrameCall, FrameOutput
from lstmgen_client.errors import (CancelledError, DeadlineExceededError, InternalError, InvalidArgumentError,
                                   FailedPreconditionError, LstmgenError, OverloadedError, RequestTooLargeError,
                                   UnauthenticatedError, UnavailableError)
from lstmgen_client.types import (Finished, GenerateResult, Limits, ServerLimits, ModelInfo, StreamChunk, TokenLogprob,
                                  TopLogprob)

__all__ = ["AsyncClient", "AsyncConversation", "AsyncFrameCall", "CancelledError", "Client", "Conversation", "DeadlineExceededError", "FailedPreconditionError", "Finished", "FrameCall", "FrameOutput", "GenerateResult",
           "InternalError", "InvalidArgumentError", "Limits", "ServerLimits", "LstmgenError", "ModelInfo", "OverloadedError",
           "RequestTooLargeError", "StreamChunk", "TokenLogprob", "TopLogprob", "UnauthenticatedError", "UnavailableError"]
__version__ = "0.1.0"
