"""Generated protobuf/gRPC stubs (from proto/ktfed/v1 by `make proto`) and the helpers around them."""
