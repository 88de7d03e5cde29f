# The AWS CLI with the Session Manager plugin, which `aws ssm start-session` needs for
# shells and port forwarding (infra/aws.sh shell|notebook|dashboard|...). The stock
# amazon/aws-cli image does not have it.
FROM amazon/aws-cli:2.17.0

# Pinned plugin build, from AWS's download bucket (the image is Amazon Linux 2, hence yum/rpm).
ARG SESSION_MANAGER_PLUGIN_VERSION=1.2.707.0
RUN curl -fsSL -o /tmp/session-manager-plugin.rpm \
      "https://s3.amazonaws.com/session-manager-downloads/plugin/${SESSION_MANAGER_PLUGIN_VERSION}/linux_64bit/session-manager-plugin.rpm" \
    && yum install -y -q /tmp/session-manager-plugin.rpm \
    && rm -f /tmp/session-manager-plugin.rpm \
    && yum clean all \
    && session-manager-plugin --version
