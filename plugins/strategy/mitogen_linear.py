# The linear strategy run through Mitogen for Ansible (the `mitogen` package
# of the toolchain, requirements-controller.txt): one Python interpreter per
# host, kept for the whole run, instead of a new `docker exec` or SSH session
# and a new Python for every task. ansible.cfg and Molecule name it; this file
# makes it loadable without a path into the virtualenv.
import ansible_mitogen.strategy
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401

# Tasks on the controller itself keep Ansible's own local connection. They
# are few and cheap (no exec into a host), and Mitogen's differs there: it
# runs sudo even to become the user it already is, and the Docker SDK of an
# async task (Molecule's create and destroy) hangs in its forked child.
ansible_mitogen.strategy.REDIRECTED_CONNECTION_PLUGINS = tuple(
    name for name in ansible_mitogen.strategy.REDIRECTED_CONNECTION_PLUGINS if name != "local")
