"""The one table of numeric tolerances used by the test suite: (rtol, atol) per comparison kind."""

import torch

# float32 computation compared with a float64 reference loop
FP32_VS_REFERENCE = {"rtol": 1e-5, "atol": 1e-6}
# float32 computation compared with another library (peft, torch.optim.swa_utils) doing float32 too
FP32_VS_LIBRARY = {"rtol": 1e-5, "atol": 1e-6}
# half-precision outputs compared with a float32 result cast to that dtype
HALF = {torch.float16: {"rtol": 1e-3, "atol": 1e-3}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}
# end-to-end model outputs (embeddings) of a merged model vs the original
MODEL_OUTPUT = {"rtol": 1e-5, "atol": 1e-5}
