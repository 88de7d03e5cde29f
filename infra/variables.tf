# ---------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------

variable "region" {
  type        = string
  description = "AWS region. Restricted to regions in EU member states because the images may contain personal data (GDPR)."
  default     = "eu-west-1"

  validation {
    # London (eu-west-2) and Zurich (eu-central-2) are outside the EU; they have
    # adequacy decisions, but adding them is a decision for the data protection
    # officer, not a default.
    condition     = contains(["eu-west-1", "eu-west-3", "eu-central-1", "eu-north-1", "eu-south-1", "eu-south-2"], var.region)
    error_message = "region must be an AWS region in an EU member state (eu-west-1, eu-west-3, eu-central-1, eu-north-1, eu-south-1, eu-south-2): m9 processes images that may hold personal data (GDPR)."
  }
}

variable "name" {
  type        = string
  description = "Name prefix for every resource (lowercase letters, digits and dashes)."
  default     = "m9"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2-21 characters of lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "tags" {
  type        = map(string)
  description = "Extra tags applied to every resource."
  default     = {}
}

# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------

variable "bucket_name" {
  type        = string
  description = "Name of the S3 bucket for inputs, outputs, logs and bootstrap files. Null lets AWS add a unique suffix to \"<name>-\"."
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, dots and dashes)."
  }
}

variable "force_destroy_bucket" {
  type        = bool
  description = "Allow terraform destroy to delete the bucket while it still holds objects. Keep false unless the outputs are disposable."
  default     = false
}

variable "log_retention_days" {
  type        = number
  description = "Days after which objects under logs/ (EMR and VPC flow logs) expire."
  default     = 30

  validation {
    condition     = var.log_retention_days >= 1
    error_message = "log_retention_days must be at least 1."
  }
}

variable "tmp_retention_days" {
  type        = number
  description = "Days after which objects under tmp/ expire."
  default     = 7

  validation {
    condition     = var.tmp_retention_days >= 1
    error_message = "tmp_retention_days must be at least 1."
  }
}

variable "noncurrent_version_retention_days" {
  type        = number
  description = "Days a replaced or deleted object version is kept before it expires (versioning is on)."
  default     = 30

  validation {
    condition     = var.noncurrent_version_retention_days >= 1
    error_message = "noncurrent_version_retention_days must be at least 1."
  }
}

# ---------------------------------------------------------------------------
# What the bootstrap action installs
# ---------------------------------------------------------------------------

variable "m9_dist" {
  type        = string
  description = "Local path of the m9 wheel or sdist to install on every node (build it with `python -m pip wheel --no-deps -w dist .`). Uploaded to s3://<bucket>/bootstrap/."

  validation {
    condition     = can(regex("^m9-[^/]+(\\.whl|\\.tar\\.gz)$", basename(var.m9_dist))) && fileexists(var.m9_dist)
    error_message = "m9_dist must be an existing file named m9-<version>...(.whl|.tar.gz)."
  }
}

variable "constraints_file" {
  type        = string
  description = "Local path of the exact pins m9 is tested with. Null means the repository's constraints.txt. Uploaded beside the wheel; the bootstrap installs with `pip install -c` against it."
  default     = null
}

variable "wheelhouse_dir" {
  type        = string
  description = "Local folder built by bootstrap/build_wheelhouse.sh (hashed wheels, requirements.txt, weights/), uploaded to s3://<bucket>/bootstrap/wheelhouse/; the nodes install only from it. Null means infra/wheelhouse, where infra/aws.sh up builds it."
  default     = null
}

variable "m9_venv" {
  type        = string
  description = "Python 3.11 virtualenv the bootstrap creates on every node, on the EBS volume EMR mounts at /mnt (TensorFlow alone is ~1.3 GB; the root volume is kept for the OS). PYSPARK_PYTHON points at its interpreter, so Spark executors and the Ray workers run the same m9."
  default     = "/mnt/m9/venv"

  validation {
    condition     = can(regex("^/[A-Za-z0-9._/-]+$", var.m9_venv))
    error_message = "m9_venv must be an absolute path without spaces."
  }
}

variable "m9_cache_dir" {
  type        = string
  description = "Where the bootstrap puts the MobileNetV2 weights (M9_CACHE_DIR), on the EBS volume at /mnt. Shared by the hadoop user (steps, Ray) and YARN containers, so not under a home directory."
  default     = "/mnt/m9/cache"

  validation {
    condition     = can(regex("^/[A-Za-z0-9._/-]+$", var.m9_cache_dir))
    error_message = "m9_cache_dir must be an absolute path without spaces."
  }
}

variable "ray_cpu_fraction" {
  type        = number
  description = "Share of each core/task node's vCPUs offered to Ray (rounded down, at least 1). YARN is configured (yarn-site, DominantResourceCalculator) to offer only the remaining vCPUs and the same share less of its memory, so Ray actors and Spark executors get disjoint cores. The master offers Ray no CPUs."
  default     = 0.5

  validation {
    condition     = var.ray_cpu_fraction > 0 && var.ray_cpu_fraction < 1
    error_message = "ray_cpu_fraction must be in (0, 1): YARN needs some vCPUs too."
  }
}

variable "ray_temp_dir" {
  type        = string
  description = "Ray's --temp-dir on every node (sessions, logs, sockets and spilled objects), on the EBS volume at /mnt, not on /tmp (which may be a small tmpfs). The Ray token file is written beside it. Keep it short: Ray's unix socket paths under it must stay below 107 bytes."
  default     = "/mnt/m9/ray"

  validation {
    condition     = can(regex("^/[A-Za-z0-9._/-]{1,30}$", var.ray_temp_dir))
    error_message = "ray_temp_dir must be an absolute path of at most 31 characters without spaces."
  }
}

variable "ray_port" {
  type        = number
  description = "Port of the Ray head (GCS) on the master node. Only reachable inside the cluster's security groups."
  default     = 6379

  validation {
    condition     = var.ray_port >= 1024 && var.ray_port <= 65535
    error_message = "ray_port must be an unprivileged TCP port."
  }
}

# ---------------------------------------------------------------------------
# EMR cluster
# ---------------------------------------------------------------------------

variable "release_label" {
  type        = string
  description = "EMR release. emr-7.13.0 ships Spark 3.5.6 and Python 3.11 on Amazon Linux 2023."
  default     = "emr-7.13.0"

  validation {
    condition     = startswith(var.release_label, "emr-7.")
    error_message = "release_label must be an emr-7.x release (Amazon Linux 2023 with Python 3.11)."
  }
}

variable "master_instance_type" {
  type        = string
  description = "EC2 instance type of the master node (Spark driver and Ray head)."
  default     = "m5.xlarge"
}

variable "core_instance_type" {
  type        = string
  description = "EC2 instance type of the core nodes (HDFS, Spark executors, Ray workers)."
  default     = "m5.2xlarge"
}

variable "core_instance_count" {
  type        = number
  description = "Number of core nodes."
  default     = 2

  validation {
    condition     = var.core_instance_count >= 1
    error_message = "core_instance_count must be at least 1."
  }
}

variable "task_instance_type" {
  type        = string
  description = "EC2 instance type of the optional spot task nodes."
  default     = "m5.2xlarge"
}

variable "task_instance_count" {
  type        = number
  description = "Number of spot task nodes (0 = no task instance group). They run Spark executors and join Ray like core nodes."
  default     = 0

  validation {
    condition     = var.task_instance_count >= 0
    error_message = "task_instance_count must not be negative."
  }
}

variable "task_bid_price" {
  type        = string
  description = "Maximum spot price for task nodes, in USD, or \"OnDemandPrice\" to cap at the on-demand price."
  default     = "OnDemandPrice"
}

variable "ebs_volume_size_gb" {
  type        = number
  description = "Size of the gp3 EBS volume on every node, mounted by EMR at /mnt: HDFS and Spark shuffle, m9's venv and weights (m9_venv, m9_cache_dir), Ray's temp and spill folder (ray_temp_dir)."
  default     = 64

  validation {
    condition     = var.ebs_volume_size_gb >= 32
    error_message = "ebs_volume_size_gb must be at least 32."
  }
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of every node's root EBS volume (EMR's default is 15 GiB): the OS, EMR's applications and their logs under /var/log. m9 itself lives on the data volume (ebs_volume_size_gb)."
  default     = 32

  validation {
    condition     = var.root_volume_size_gb >= 15 && var.root_volume_size_gb <= 100
    error_message = "root_volume_size_gb must be between 15 and 100 (EMR's limits)."
  }
}

variable "idle_timeout_seconds" {
  type        = number
  description = "The cluster terminates itself after this many idle seconds, so a forgotten cluster does not keep billing."
  default     = 3600

  validation {
    condition     = var.idle_timeout_seconds >= 60 && var.idle_timeout_seconds <= 604800
    error_message = "idle_timeout_seconds must be between 60 and 604800 (EMR's limits)."
  }
}

variable "in_transit_certificate_s3_object" {
  type        = string
  description = "s3:// URI of a zip with PEM certificates (privateKey.pem, certificateChain.pem, trustedCertificates.pem) for EMR in-transit encryption. Empty disables in-transit encryption, because EMR cannot enable it without a certificate provider."
  default     = ""

  validation {
    condition     = var.in_transit_certificate_s3_object == "" || can(regex("^s3://[^/]+/.+\\.zip$", var.in_transit_certificate_s3_object))
    error_message = "in_transit_certificate_s3_object must be empty or an s3://bucket/key.zip URI."
  }
}

# ---------------------------------------------------------------------------
# Network and access
# ---------------------------------------------------------------------------

variable "vpc_cidr" {
  type        = string
  description = "CIDR of the VPC created for the cluster."
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr))
    error_message = "vpc_cidr must be an IPv4 CIDR block."
  }
}

variable "availability_zone_suffix" {
  type        = string
  description = "Letter of the availability zone in var.region for the subnets (a single AZ keeps shuffle traffic free)."
  default     = "a"

  validation {
    condition     = can(regex("^[a-f]$", var.availability_zone_suffix))
    error_message = "availability_zone_suffix must be one letter a-f."
  }
}

variable "allowed_ssh_cidrs" {
  type        = list(string)
  description = "Private networks (RFC 1918) allowed to reach the master on port 22, for a VPN, peering or transit gateway you attach to the VPC yourself: the cluster's subnet has no route from the internet, so a public CIDR could never connect. Empty (the default) opens no port at all; use Session Manager (infra/aws.sh shell and port forwarding) instead."
  default     = []

  validation {
    # c lies inside net when c's prefix is at least as long and c's address, cut to net's prefix, is net's.
    condition = alltrue([for c in var.allowed_ssh_cidrs : can(cidrnetmask(c)) && anytrue([
      for net in ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"] :
      can(cidrnetmask(c)) ? (
        tonumber(split("/", c)[1]) >= tonumber(split("/", net)[1])
        && cidrhost("${split("/", c)[0]}/${split("/", net)[1]}", 0) == split("/", net)[0]
      ) : false
    ])])
    error_message = "allowed_ssh_cidrs must be private IPv4 CIDR blocks (inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16): the subnet has no public route, and 0.0.0.0/0 is never allowed."
  }
}

variable "ec2_key_name" {
  type        = string
  description = "Name of an existing EC2 key pair for SSH (only useful with allowed_ssh_cidrs). Null means no key pair."
  default     = null
}

# ---------------------------------------------------------------------------
# The run command printed by the outputs
# ---------------------------------------------------------------------------

variable "embed_actors" {
  type        = number
  description = "--actors used in the example `m9 run` step (one Keras model per actor)."
  default     = 4
}

variable "pca_k" {
  type        = number
  description = "--k used in the example `m9 run` step (PCA components)."
  default     = 50
}

variable "manage_session_preferences" {
  description = "Manage SSM-SessionManagerRunShell, Session Manager's preferences for the whole account and region, so that sessions started without a document are recorded to this bucket like the stack's own shell document. One per account and region: import an existing one, or set false where another stack owns it."
  type        = bool
  default     = true
}
