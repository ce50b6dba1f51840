"""For development and the demo: real local services (`localstack`), the jimeng- and Ark-compatible fakes
(`jimeng_sandbox`, `ark_sandbox`) and the local stack behind `make demo` (`devstack`). Production never
imports these."""
