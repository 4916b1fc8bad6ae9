"""The local kit users can import in their own tests: the EggAPI emulator, local S3, the stack.

Everything here runs on loopback with no account and no network.
"""
