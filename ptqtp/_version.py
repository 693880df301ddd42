__version__ = "0.1.0"

# transformers versions whose quantizer/loader API ptqtp follows: [MIN, next major); setup.py installs this pin
TRANSFORMERS_MIN = (5, 0)
TRANSFORMERS_MAX_MAJOR = 5
TRANSFORMERS_PIN = "transformers>=5.0,<6"
